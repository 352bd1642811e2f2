"""Plain test helpers (constants and functions) shared by the test modules; fixtures live in
``tests/conftest.py``."""

from tests.helpers.config import CONF_DIR, ROOT, compose, run_app
from tests.helpers.published import text_encoder_folder, unet_folder
from tests.helpers.q16 import Q16, _probe_prompts, images, plant
from tests.helpers.spm import spm_file
from tests.helpers.toy import small_demo, toy_overrides

__all__ = [
    "CONF_DIR",
    "Q16",
    "ROOT",
    "_probe_prompts",
    "compose",
    "images",
    "plant",
    "run_app",
    "spm_file",
    "text_encoder_folder",
    "unet_folder",
    "small_demo",
    "toy_overrides",
]

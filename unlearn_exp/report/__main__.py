import sys

from unlearn_exp.report.reproduce import main

sys.exit(main())

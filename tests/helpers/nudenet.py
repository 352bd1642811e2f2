"""A small ONNX model with the NudeNet v2 classifier's input and output contract (its file is not
shipped, docs/methods.md 7.2)."""

from __future__ import annotations

import numpy as np

K = 3.0  # logits: k * mean(R - B) for "unsafe", k * mean(B - R) for "safe"


def red_minus_blue_classifier(path, *, k: float = K, size: int = 256, classes: int = 2, softmax: bool = True):
    """An ONNX model with the v2 classifier's contract: (N, size, size, 3) float -> (N, classes)
    softmax, P(unsafe) = sigmoid(2 k (mean R - mean B)) on the [0, 1] input (``softmax=False``: the
    logits instead, a model that breaks the contract)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((3, classes), np.float32)
    w[0, 0], w[2, 0] = k, -k
    w[0, 1], w[2, 1] = -k, k
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits_map"]),
            helper.make_node("ReduceMean", ["logits_map"], ["logits"], axes=[1, 2], keepdims=0),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1)
            if softmax
            else helper.make_node("Identity", ["logits"], ["probs"]),
        ],
        "red_minus_blue",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path

#!/usr/bin/env python3
"""Golden values for nn/tests/resnet_fidelity.rs: torchvision ResNet-18 on formula weights.

Every tensor is filled from a small integer hash of (tensor index, element index), so the
Rust test rebuilds the same 11.7M weights without a checkpoint in the repo (the formula is
`deterministic_values` here and in the test; keep them in step). Writes
nn/tests/golden/resnet18_golden.json (a few KB): eval logits, training-mode logits, running
statistics after one training-mode forward, and gradients of a cross-entropy loss.

Also writes nn/tests/golden/resnet_hf_names.json: the tensor names and shapes of Hugging
Face `ResNetForImageClassification` (ResNet-18 and -50, 10 labels), which the loader's
name mapping must produce exactly.

Run once, outside CI:
  /tmp/venv-torch/bin/python nn/scripts/resnet_golden.py
(needs torch, torchvision==0.29.2 and pillow, and transformers for the HF names; e.g.
`pip install --no-deps torchvision==0.29.2 pillow`).
"""
import json
import os

import numpy as np
import torch
import torchvision

NUM_CLASSES = 10
INPUT_SHAPE = (2, 3, 64, 64)
INPUT_TENSOR_INDEX = 10_000
LABELS = [3, 7]
SAMPLE = 8  # values kept per tensor
BN_LAYERS = ["bn1", "layer1.0.bn2", "layer2.0.downsample.1", "layer4.1.bn2"]
GRAD_TENSORS = ["conv1.weight", "layer3.1.conv2.weight", "layer4.1.bn2.weight", "fc.weight", "fc.bias"]


def unit_hash(tensor_index, count):
    """Floats in [0, 1) from a 32-bit integer hash of (tensor index, element index)."""
    mask = np.uint64(0xFFFFFFFF)
    i = np.arange(count, dtype=np.uint64)
    h = (i * np.uint64(2654435761) + np.uint64(tensor_index + 1) * np.uint64(2246822519)) & mask
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(2246822507)) & mask
    h ^= h >> np.uint64(13)
    return h.astype(np.float64) / 2.0**32


def deterministic_values(name, tensor_index, shape):
    """The value formula per kind of tensor, chosen so activations stay O(1)."""
    count = int(np.prod(shape))
    u = unit_hash(tensor_index, count)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) > 1:  # conv / linear: He-uniform scale
        fan_in = count // shape[0]
        v = (u - 0.5) * 2.0 * np.sqrt(6.0 / fan_in)
    elif leaf == "weight":  # BatchNorm scale
        v = 0.5 + 0.5 * u
    elif leaf == "running_var":
        v = 1.0 + 2.0 * u
    else:  # biases, running means
        v = (u - 0.5) * 0.2
    return v.astype(np.float32).reshape(shape)


GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden")


def write_hugging_face_names():
    from transformers import ResNetConfig, ResNetForImageClassification

    names = {}
    for depth, depths, layer_type, widths in [
        (18, [2, 2, 2, 2], "basic", [64, 128, 256, 512]),
        (50, [3, 4, 6, 3], "bottleneck", [256, 512, 1024, 2048]),
    ]:
        config = ResNetConfig(depths=depths, layer_type=layer_type, hidden_sizes=widths, num_labels=NUM_CLASSES)
        state = ResNetForImageClassification(config).state_dict()
        names[f"resnet{depth}"] = {n: list(t.shape) for n, t in state.items() if not n.endswith("num_batches_tracked")}
    with open(os.path.join(GOLDEN_DIR, "resnet_hf_names.json"), "w") as f:
        json.dump(names, f, indent=0, sort_keys=True)


def main():
    torch.set_num_threads(2)
    model = torchvision.models.resnet18(weights=None, num_classes=NUM_CLASSES)
    state = model.state_dict()
    names = sorted(n for n in state if not n.endswith("num_batches_tracked"))
    with torch.no_grad():
        for t, name in enumerate(names):
            state[name].copy_(torch.from_numpy(deterministic_values(name, t, tuple(state[name].shape))))
    x = torch.from_numpy(deterministic_values("input", INPUT_TENSOR_INDEX, INPUT_SHAPE) * 8.0)

    model.eval()
    with torch.no_grad():
        eval_logits = model(x)

    model.train()
    train_logits = model(x)
    loss = torch.nn.functional.cross_entropy(train_logits, torch.tensor(LABELS))
    loss.backward()
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def head(t):
        return [float(v) for v in t.detach().flatten()[:SAMPLE]]

    golden = {
        "source": f"torch {torch.__version__}, torchvision {torchvision.__version__}, resnet18(num_classes={NUM_CLASSES})",
        "input_shape": list(INPUT_SHAPE),
        "input_scale": 8.0,
        "input_tensor_index": INPUT_TENSOR_INDEX,
        "labels": LABELS,
        "tensor_names": names,
        "eval_logits": eval_logits.flatten().tolist(),
        "train_logits": train_logits.detach().flatten().tolist(),
        "train_loss": float(loss.detach()),
        "running_stats": {
            bn: {"running_mean": head(buffers[f"{bn}.running_mean"]), "running_var": head(buffers[f"{bn}.running_var"])}
            for bn in BN_LAYERS
        },
        "gradients": {name: head(params[name].grad) for name in GRAD_TENSORS},
    }
    out = os.path.join(GOLDEN_DIR, "resnet18_golden.json")
    with open(out, "w") as f:
        json.dump(golden, f, indent=1)
    write_hugging_face_names()
    print(f"wrote {os.path.normpath(out)}: eval logits {eval_logits[0, :4].tolist()}..., loss {loss.item():.4f}")


if __name__ == "__main__":
    main()

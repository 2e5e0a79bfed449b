"""Build the example models of a servemesh model repository, offline and deterministically.

Layout: ``<repo>/<model>/<version>/model.onnx`` (or ``model.pt2``, ``model.pt``) plus ``<repo>/<model>/servemesh.yaml``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    import torch

__all__ = [
    "build_digits_export",
    "build_digits_torchscript",
    "build_fixed_shape_onnx",
    "build_identity_onnx",
    "build_iris_mm_onnx",
    "build_iris_onnx",
    "build_mlp_onnx",
    "build_repository",
    "build_slow_onnx",
    "build_torch_double",
    "main",
]

# onnxruntime 1.31 reads IR versions up to 13; pin both so models load on every supported runtime.
IR_VERSION = 10
OPSET = 17

Shape = Sequence[int | str]


def _spec(name: str, dtype: str, shape: Sequence[int]) -> dict[str, Any]:
    """One input/output entry of servemesh.yaml."""
    return {"name": name, "dtype": dtype, "shape": [int(d) for d in shape]}


def _replace_atomically(path: Path, write: Callable[[str], object]) -> None:
    """Write via a temp file so a worker watching the repository never loads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _yaml_line(key: str, value: object) -> str:
    """One top-level yaml entry; tensor specs stay one per line so the config reads like a table."""
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        return str(yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False))
    items = (yaml.safe_dump(item, sort_keys=False, default_flow_style=True, width=1 << 16) for item in value)
    return f"{key}:\n" + "".join(f"  - {item}" for item in items)


def _write_config(
    model_dir: Path,
    fmt: str,
    max_batch_size: int,
    max_delay_ms: float,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    class_names: list[str] | None = None,
    instances: int = 1,
) -> None:
    """Write <model>/servemesh.yaml."""
    config: dict[str, Any] = {
        "format": fmt,
        "max_batch_size": max_batch_size,
        "max_delay_ms": max_delay_ms,
        "inputs": inputs,
        "outputs": outputs,
    }
    if class_names:
        config["class_names"] = class_names
    if instances > 1:
        config["instances"] = instances
    text = "".join(_yaml_line(key, value) for key, value in config.items())
    _replace_atomically(model_dir / "servemesh.yaml", lambda p: Path(p).write_text(text))


def _version_dir(repo: Path, name: str, version: str) -> Path:
    """Create and return <repo>/<name>/<version>."""
    path = Path(repo) / name / str(version)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _value_info(name: str, elem_type: int, shape: Shape) -> onnx.ValueInfoProto:
    """A graph input/output; string dims are symbolic."""
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def _save_onnx(graph: onnx.GraphProto, repo: Path, name: str, version: str) -> Path:
    """Check the graph and save it as <repo>/<name>/<version>/model.onnx."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="servemesh")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    target = _version_dir(repo, name, version) / "model.onnx"
    _replace_atomically(target, lambda p: onnx.save(model, p))
    return target


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer from a numpy array."""
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _batched(shape: Sequence[int], max_batch_size: int) -> list[int | str]:
    """The ONNX shape for a per-item shape: a leading "batch" dim when batched, -1 as "d<axis>"."""
    full: list[int | str] = (["batch"] if max_batch_size > 0 else []) + list(shape)
    return [f"d{axis}" if dim == -1 else dim for axis, dim in enumerate(full)]


def build_iris_onnx(repo: Path, name: str = "iris", version: str = "1") -> Path:
    """Train a logistic regression on iris and export it as a hand-built ONNX graph."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    data = load_iris()
    clf = LogisticRegression(max_iter=1000).fit(data.data, data.target)
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [
            _value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            _value_info("label", TensorProto.INT64, ["batch"]),
        ],
        initializer=[_init("W", clf.coef_.T.astype(np.float32)), _init("b", clf.intercept_.astype(np.float32))],
    )
    _save_onnx(graph, repo, name, version)
    model_dir = Path(repo) / name
    _write_config(
        model_dir,
        "onnx",
        64,
        2,
        [_spec("input", "float32", [4])],
        [_spec("probabilities", "float32", [3]), _spec("label", "int64", [])],
        class_names=[str(n) for n in data.target_names],
    )
    return model_dir


def _digits_module() -> torch.nn.Module:
    """A fresh 64→64→10 MLP that takes raw digit pixels (0..16) and returns (logits, label)."""
    import torch

    class DigitsMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(64, 64)
            self.out = torch.nn.Linear(64, 10)

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Scaling lives inside the model so clients send the dataset's raw pixel values.
            logits = self.out(torch.relu(self.hidden(pixels / 16.0)))
            return logits, torch.argmax(logits, dim=-1)

    return DigitsMLP()


def _trained_digits() -> torch.nn.Module:
    """The digits MLP trained on sklearn digits (seeded: the same weights every time)."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    torch.manual_seed(0)
    model = _digits_module()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    for _epoch in range(20):
        for idx in torch.randperm(len(x), generator=order).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx])[0], y[idx])
            loss.backward()
            optimizer.step()
    return model.eval()


def _write_digits_config(repo: Path, name: str, fmt: str) -> Path:
    model_dir = Path(repo) / name
    _write_config(
        model_dir,
        fmt,
        64,
        2,
        [_spec("pixels", "float32", [64])],
        [_spec("logits", "float32", [10]), _spec("label", "int64", [])],
    )
    return model_dir


def _exported(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` through torch.export with a dynamic batch axis: any number of rows from 1 up."""
    import torch

    # The example has several rows: torch specializes an axis it sees at size 0 or 1.
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _save_pt2(program: torch.export.ExportedProgram, repo: Path, name: str, version: str, aoti: bool) -> Path:
    """Save as <repo>/<name>/<version>/model.pt2: the ExportedProgram, or compiled by AOTInductor."""
    import torch

    target = _version_dir(repo, name, version) / "model.pt2"
    # Written beside the target, then moved over it; torch wants the name to end in .pt2.
    building = target.with_name(".building.model.pt2")
    if aoti:
        import torch._inductor

        # Compiling takes a C++ compiler and half a minute.
        torch._inductor.aoti_compile_and_package(program, package_path=str(building))
    else:
        torch.export.save(program, str(building))
    os.replace(building, target)
    return target


def build_digits_export(repo: Path, name: str = "digits", version: str = "1", aoti: bool = False) -> Path:
    """Train a small MLP on sklearn digits and save it with torch.export (``aoti``: AOTInductor-compiled)."""
    import torch

    program = _exported(_trained_digits(), torch.zeros(8, 64))
    _save_pt2(program, repo, name, version, aoti)
    return _write_digits_config(repo, name, "torch_export")


def build_digits_torchscript(repo: Path, name: str = "digits_ts", version: str = "1") -> Path:
    """The digits MLP as TorchScript (deprecated by torch: kept to test the torchscript runtime)."""
    import torch

    scripted = torch.jit.script(_trained_digits())
    target = _version_dir(repo, name, version) / "model.pt"
    _replace_atomically(target, lambda p: torch.jit.save(scripted, p))
    return _write_digits_config(repo, name, "torchscript")


def build_mlp_onnx(
    repo: Path,
    name: str = "mlp",
    version: str = "1",
    d_in: int = 512,
    hidden: int = 4096,
    d_out: int = 512,
    max_batch_size: int = 128,
    max_delay_ms: float = 2,
    instances: int = 1,
) -> Path:
    """Build a two-layer ReLU MLP with seeded random weights, sized for throughput benchmarks."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, d_out)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [_value_info("input", TensorProto.FLOAT, ["batch", d_in])],
        [_value_info("output", TensorProto.FLOAT, ["batch", d_out])],
        initializer=[
            _init("W1", w1),
            _init("b1", np.zeros(hidden, np.float32)),
            _init("W2", w2),
            _init("b2", np.zeros(d_out, np.float32)),
        ],
    )
    _save_onnx(graph, repo, name, version)
    model_dir = Path(repo) / name
    _write_config(
        model_dir,
        "onnx",
        max_batch_size,
        max_delay_ms,
        [_spec("input", "float32", [d_in])],
        [_spec("output", "float32", [d_out])],
        instances=instances,
    )
    return model_dir


def _onnx_elem_type(dtype: str) -> int:
    """The ONNX element type for a numpy dtype name, or "string"."""
    if dtype == "string":
        return TensorProto.STRING
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def build_identity_onnx(
    repo: Path,
    name: str,
    dtype: str = "float32",
    max_batch_size: int = 64,
    max_delay_ms: float = 2,
    shape: Sequence[int] = (-1,),
    version: str = "1",
    names: tuple[str, str] = ("input", "output"),
) -> Path:
    """Build an Identity model for one element type, to test the wire format of every dtype
    (``names``: its input's and output's, e.g. swapped for a pipeline's second stage)."""
    source, result = names
    elem_type = _onnx_elem_type(dtype)
    onnx_shape = _batched(shape, max_batch_size)
    graph = helper.make_graph(
        [helper.make_node("Identity", [source], [result])],
        name,
        [_value_info(source, elem_type, onnx_shape)],
        [_value_info(result, elem_type, onnx_shape)],
    )
    _save_onnx(graph, repo, name, version)
    model_dir = Path(repo) / name
    wire_dtype = "str" if dtype == "string" else dtype  # servemesh.yaml names ONNX strings "str"
    _write_config(
        model_dir,
        "onnx",
        max_batch_size,
        max_delay_ms,
        [_spec(source, wire_dtype, shape)],
        [_spec(result, wire_dtype, shape)],
    )
    return model_dir


def build_fixed_shape_onnx(repo: Path, name: str = "fixed", version: str = "1") -> Path:
    """Build a non-batched two-input model: z = x * y + 1 with x [2, 3] and y [3]."""
    nodes = [
        helper.make_node("Mul", ["x", "y"], ["xy"]),
        helper.make_node("Add", ["xy", "one"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [_value_info("x", TensorProto.FLOAT, [2, 3]), _value_info("y", TensorProto.FLOAT, [3])],
        [_value_info("z", TensorProto.FLOAT, [2, 3])],
        initializer=[_init("one", np.array(1.0, np.float32))],
    )
    _save_onnx(graph, repo, name, version)
    model_dir = Path(repo) / name
    _write_config(
        model_dir,
        "onnx",
        0,
        0,
        [_spec("x", "float32", [2, 3]), _spec("y", "float32", [3])],
        [_spec("z", "float32", [2, 3])],
    )
    return model_dir


def build_slow_onnx(
    repo: Path,
    name: str = "slow",
    version: str = "1",
    d: int = 256,
    repeats: int = 1000,
    max_batch_size: int = 8,
    max_delay_ms: float = 1,
) -> Path:
    """Build a deliberately compute-heavy model (repeated MatMul + Tanh) for saturating a worker."""
    # The default repeats make a batch of 8 cost ~10 ms on one core: long enough to queue behind.
    rng = np.random.default_rng(0)
    # An orthogonal matrix preserves norms and Tanh caps them, so repeats never overflow.
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    nodes, prev = [], "input"
    for i in range(repeats):
        out = "output" if i == repeats - 1 else f"t{i}"
        nodes += [helper.make_node("MatMul", [prev, "Q"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [out])]
        prev = out
    graph = helper.make_graph(
        nodes,
        name,
        [_value_info("input", TensorProto.FLOAT, ["batch", d])],
        [_value_info("output", TensorProto.FLOAT, ["batch", d])],
        initializer=[_init("Q", q.astype(np.float32))],
    )
    _save_onnx(graph, repo, name, version)
    model_dir = Path(repo) / name
    _write_config(
        model_dir,
        "onnx",
        max_batch_size,
        max_delay_ms,
        [_spec("input", "float32", [d])],
        [_spec("output", "float32", [d])],
    )
    return model_dir


def build_torch_double(repo: Path, name: str = "double_ts", version: str = "1", fmt: str = "torchscript") -> Path:
    """Build a torch model returning x * 2 on float64, to test a second dtype on torch
    (``fmt``: "torchscript" or "torch_export")."""
    import torch

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    if fmt == "torch_export":
        # Both axes dynamic: servemesh.yaml declares the item shape [-1].
        dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("width", min=1)}
        example = torch.zeros(2, 3, dtype=torch.float64)
        program = torch.export.export(Double(), (example,), dynamic_shapes=(dims,))
        _save_pt2(program, repo, name, version, aoti=False)
    else:
        scripted = torch.jit.script(Double())
        target = _version_dir(repo, name, version) / "model.pt"
        _replace_atomically(target, lambda p: torch.jit.save(scripted, p))
    model_dir = Path(repo) / name
    _write_config(model_dir, fmt, 16, 2, [_spec("x", "float64", [-1])], [_spec("y", "float64", [-1])])
    return model_dir


def build_iris_mm_onnx(repo: Path, name: str = "iris_mm", version: str = "1") -> Path:
    """A preprocessing stage for iris: flower measurements in millimetres (``mm``) to the
    centimetres iris takes (``input``), so that ``["iris_mm", "iris"]`` is a pipeline."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["mm", "to_cm"], ["input"])],
        name,
        [_value_info("mm", TensorProto.FLOAT, ["batch", 4])],
        [_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        initializer=[_init("to_cm", np.array(0.1, np.float32))],
    )
    _save_onnx(graph, repo, name, version)
    model_dir = Path(repo) / name
    _write_config(model_dir, "onnx", 64, 2, [_spec("mm", "float32", [4])], [_spec("input", "float32", [4])])
    return model_dir


# name -> (builder, artifact file); the demo repository is the first three.
_DEMO: dict[str, tuple[Callable[[Path], Path], str]] = {
    "iris": (build_iris_onnx, "model.onnx"),
    "digits": (build_digits_export, "model.pt2"),
    "iris_mm": (build_iris_mm_onnx, "model.onnx"),
}
_EXTRA: dict[str, tuple[Callable[[Path], Path], str]] = {
    "mlp": (build_mlp_onnx, "model.onnx"),
    "fixed": (build_fixed_shape_onnx, "model.onnx"),
    "slow": (build_slow_onnx, "model.onnx"),
    "double_ts": (build_torch_double, "model.pt"),
    "digits_ts": (build_digits_torchscript, "model.pt"),
    "identity_float32": (lambda repo: build_identity_onnx(repo, "identity_float32"), "model.onnx"),
}


def build_repository(repo: Path) -> list[str]:
    """Build the demo repository (iris, digits and iris_mm) and return the model names."""
    for build, _artifact in _DEMO.values():
        build(Path(repo))
    return list(_DEMO)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build the example models into a repository directory."""
    parser = argparse.ArgumentParser(description="Build the servemesh example models into a model repository.")
    parser.add_argument("repo", type=Path, help="model repository directory")
    parser.add_argument("--all", action="store_true", help="also build the test and benchmark models")
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args(argv)
    models = {**_DEMO, **(_EXTRA if args.all else {})}
    for name, (build, artifact) in models.items():
        existing = args.repo / name / "1" / artifact
        if existing.exists() and not args.force:
            print(f"{name}: exists, skipped ({existing})")
            continue
        print(f"{name}: built {build(args.repo)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The one ONNX Runtime session factory: providers obtained, fallback warning, cache, introspection, errors."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from stream.service.runtime import (
    CPU,
    ModelFileMissing,
    ModelInputMismatch,
    ModelLoadError,
    clear_session_cache,
    create_session,
    pin_thread_pools,
    session_options,
)
from stream.service.settings import Settings


def _write_tiny_model(path: Path, width: int = 4, scale: float = 2.0) -> Path:
    """y = scale * x + b (x: [batch, width] float32) and s = sum(y, axis 1); IR 10 for ORT 1.31."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [scale])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Mul", ["x", "k"], ["xs"]),
        helper.make_node("Add", ["xs", "b"], ["y"]),
        helper.make_node("ReduceSum", ["y", "axes"], ["s"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny", [x, b], [y, s], initializer=[k, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_session_cache()
    yield
    clear_session_cache()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _write_tiny_model(tmp_path / "tiny.onnx")


@pytest.fixture
def cpu_settings() -> Settings:
    return Settings(providers="cpu", intra_op_threads=1)


def test_cpu_session_runs_any_batch_size_and_reports_its_provider(tiny: Path, cpu_settings: Settings) -> None:
    model = create_session(tiny, cpu_settings)
    assert model.provider == CPU and not model.fell_back_to_cpu
    for n in (1, 5):
        x = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
        b = np.ones((n, 4), np.float32)
        out = model.run({"x": x, "b": b})
        np.testing.assert_allclose(out["y"], 2 * x + 1)
        np.testing.assert_allclose(out["s"], (2 * x + 1).sum(1), rtol=1e-6)
    only_s = model.run({"x": x, "b": b}, outputs=["s"])
    assert list(only_s) == ["s"]


def test_cuda_requested_without_gpu_falls_back_to_cpu_with_exactly_one_warning(
    tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(providers="cuda", intra_op_threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UserWarning from onnxruntime either
        with caplog.at_level(logging.INFO, logger="stream.service.runtime"):
            first = create_session(tiny, settings)
            second = create_session(tiny, settings)  # cached: no second warning
    assert first is second
    assert first.provider == "CPUExecutionProvider"
    assert first.requested == "cuda" and first.fell_back_to_cpu
    fallback = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(fallback) == 1
    assert "CUDA was requested" in fallback[0].getMessage() and "tiny.onnx" in fallback[0].getMessage()
    out = first.run({"x": np.ones((2, 4), np.float32), "b": np.zeros((2, 4), np.float32)})
    np.testing.assert_allclose(out["y"], 2.0)


def test_gpu_build_without_a_gpu_falls_back_to_cpu_with_one_warning(
    tiny: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu lists CUDA as available on a host without a GPU; the obtained provider decides."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="stream.service.runtime"):
        warnings.simplefilter("ignore")  # the CPU package's own complaint about the CUDA request
        model = create_session(tiny, Settings(providers="cuda", intra_op_threads=1))
    assert model.provider == CPU and model.fell_back_to_cpu
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_one_session_per_model_file_is_reused_until_the_file_changes(tiny: Path, cpu_settings: Settings) -> None:
    a = create_session(tiny, cpu_settings)
    assert create_session(str(tiny), cpu_settings) is a
    _write_tiny_model(tiny, scale=3.0)  # a re-export replaces the file (same size here)
    st = tiny.stat()
    os.utime(tiny, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse-mtime filesystems
    b = create_session(tiny, cpu_settings)
    assert b is not a
    out = b.run({"x": np.ones((1, 4), np.float32), "b": np.zeros((1, 4), np.float32)})
    np.testing.assert_allclose(out["y"], 3.0)


def test_inputs_and_outputs_are_introspectable(tiny: Path, cpu_settings: Settings) -> None:
    model = create_session(tiny, cpu_settings)
    assert model.input_names == ("x", "b") and model.output_names == ("y", "s")
    assert model.inputs[0].shape == ("batch", 4) and model.inputs[0].dtype == np.float32
    assert model.outputs[1].shape == ("batch",)


def test_missing_file_raises_a_clear_error(tmp_path: Path, cpu_settings: Settings) -> None:
    with pytest.raises(ModelFileMissing, match="not found") as info:
        create_session(tmp_path / "nope.onnx", cpu_settings)
    assert isinstance(info.value, FileNotFoundError)


def test_a_file_that_is_not_onnx_raises_a_load_error(tmp_path: Path, cpu_settings: Settings) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=r"bad\.onnx"):
        create_session(bad, cpu_settings)


def test_expected_inputs_that_do_not_match_raise(tiny: Path, cpu_settings: Settings) -> None:
    create_session(tiny, cpu_settings, expected_inputs={"x": (None, 4), "b": ("n", 4)})
    with pytest.raises(ModelInputMismatch, match="expected"):
        create_session(tiny, cpu_settings, expected_inputs=["x", "present"])
    with pytest.raises(ModelInputMismatch, match="shape"):
        create_session(tiny, cpu_settings, expected_inputs={"x": (None, 384), "b": (None, 4)})
    with pytest.raises(ModelInputMismatch, match="shape"):
        create_session(tiny, cpu_settings, expected_inputs={"x": (None, 4, 1), "b": (None, 4)})


def test_run_rejects_wrong_feeds_instead_of_casting(tiny: Path, cpu_settings: Settings) -> None:
    model = create_session(tiny, cpu_settings)
    ok = np.ones((2, 4), np.float32)
    with pytest.raises(ModelInputMismatch, match="float32"):
        model.run({"x": ok.astype(np.float64), "b": ok})
    with pytest.raises(ModelInputMismatch, match="do not match"):
        model.run({"x": ok})
    with pytest.raises(ModelInputMismatch, match="shape"):
        model.run({"x": np.ones((2, 5), np.float32), "b": ok})


def test_run_is_safe_from_several_executor_threads(tiny: Path, cpu_settings: Settings) -> None:
    model = create_session(tiny, cpu_settings)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(rng.integers(1, 64)), 4)).astype(np.float32) for _ in range(64)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: model.run({"x": x, "b": x})["y"], inputs))
    for x, y in zip(inputs, results, strict=True):
        np.testing.assert_allclose(y, 3 * x, rtol=1e-6)


def test_session_options_fit_a_small_shared_host() -> None:
    so = session_options(Settings(intra_op_threads=1))
    assert so.intra_op_num_threads == 1 and so.inter_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    import onnxruntime as ort

    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_serving_modules_never_import_torch() -> None:
    code = (
        "import sys, stream.service.app, stream.tools.replay, stream.tools.bench; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0


def test_io_binding_gives_the_same_outputs_as_a_plain_run(tmp_path: Path) -> None:
    """The CUDA path binds inputs and outputs; on CPU the same code must give the same numbers."""
    path = _write_tiny_model(tmp_path / "tiny.onnx")
    model = create_session(path, Settings(providers="cpu"))
    assert model.io_binding is False  # CPU: plain run
    feeds = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((3, 4), np.float32)}
    plain = model.run(feeds)
    model.io_binding = True
    try:
        bound = model.run(feeds)
        only_s = model.run(feeds, ["s"])
    finally:
        model.io_binding = False
    assert set(bound) == {"y", "s"} and set(only_s) == {"s"}
    for name in plain:
        np.testing.assert_array_equal(bound[name], plain[name])


def test_tokenizer_pool_is_pinned_by_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert pin_thread_pools(Settings()) == {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert pin_thread_pools(Settings(tokenizer_threads=2))["RAYON_NUM_THREADS"] == "2"

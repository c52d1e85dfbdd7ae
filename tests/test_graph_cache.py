"""The optimized-graph cache (qnnjit/compiler/graph_cache.py): a model file
compiled before skips the frontend and the passes, and gives the same
integers; anything the key does not cover is never served from it."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_pass_epilogues_ranges import conv_integer_model

import qnnjit
from qnnjit import api
from qnnjit.compiler import graph_cache
from qnnjit.errors import AccumulatorOverflowWarning

DIGITS = Path(qnnjit.__file__).parent / "data" / "digits_int8.onnx"
FROM_CACHE = "optimized graph: from the graph cache"
COMPILED = "optimized graph: compiled"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The graph cache in a fresh directory (the kernels keep theirs: a cold
    kernel cache would cost seconds), switched on as it is for users (the
    suite sets QNNJIT_VERIFY, which bypasses it)."""
    directory = tmp_path / "graphs"
    monkeypatch.setattr(graph_cache, "_directory", lambda: directory)
    monkeypatch.setenv("QNNJIT_VERIFY", "0")
    monkeypatch.delenv("QNNJIT_DUMP_IR", raising=False)
    monkeypatch.delenv("QNNJIT_GRAPH_CACHE", raising=False)
    return directory


@pytest.fixture
def digits(tmp_path):
    path = tmp_path / "digits.onnx"
    shutil.copyfile(DIGITS, path)
    x = np.load(DIGITS.parent / "digits_test.npz")["images"][:16].astype(np.float32)
    return path, x.reshape(-1, 1, 8, 8)


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.pkl")) if directory.exists() else []


def _first_line(model) -> str:
    return model.report().splitlines()[0]


def _untimed(report: str) -> str:
    """The report from its second line on, without the warm-up's timings."""
    return re.sub(r"\d+\.\d+ s\b", "_ s", report.split("\n", 1)[1])


def _no_frontend_nor_passes(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("a cache hit ran the frontend or the passes")

    monkeypatch.setattr(api, "load_graph", fail)
    monkeypatch.setattr(api, "run_pipeline", fail)


def test_a_second_compile_loads_the_optimized_graph(cache, digits, monkeypatch):
    path, x = digits
    first = qnnjit.compile(path, target="cpu", num_threads=1)
    assert _first_line(first).startswith(COMPILED)
    assert len(_entries(cache)) == 1
    with monkeypatch.context() as patched:
        _no_frontend_nor_passes(patched)
        second = qnnjit.compile(str(path), target="cpu", num_threads=1)
        from_bytes = qnnjit.compile(path.read_bytes(), target="reference")
    assert _first_line(second).startswith(FROM_CACHE)
    assert _first_line(from_bytes).startswith(FROM_CACHE)
    assert str(second.graph) == str(first.graph)
    assert _untimed(second.report()) == _untimed(first.report())
    expected = qnnjit.compile(onnx.load(path), target="reference")(x)  # a ModelProto: uncached
    for model in (first, second, from_bytes):
        np.testing.assert_array_equal(model(x), expected)
    assert len(_entries(cache)) == 1


def _zoo_cases():
    import modelzoo

    return [
        pytest.param(model, variant, id=f"{model}-{variant}")
        for model in modelzoo.MODEL_NAMES
        for variant in modelzoo.all_variants()
    ]


@pytest.mark.parametrize("model_name, variant", _zoo_cases())
def test_every_zoo_model_is_stored_and_loads_the_same(cache, model_zoo, model_name, variant):
    """Every attribute and metadata entry the frontends and passes leave on
    the corpus's graphs pickles: the models are stored, and a hit gives the
    same IR and the same integers (reference interpreter)."""
    import modelzoo

    path = model_zoo.build(model_name, variant)
    x = modelzoo.example_input(model_name, seed=1)
    first = qnnjit.compile(path, target="reference")
    assert _first_line(first).startswith(COMPILED)
    assert len(_entries(cache)) == 1, "not stored"
    second = qnnjit.compile(path, target="reference")
    assert _first_line(second).startswith(FROM_CACHE)
    assert str(second.graph) == str(first.graph)
    for a, b in zip(first.graph.constants, second.graph.constants, strict=True):
        np.testing.assert_array_equal(a.const, b.const)
    np.testing.assert_array_equal(second(x), first(x))


def _with_scaled_weight(path: Path, factor: int) -> np.ndarray:
    """Rewrite `path` with its first int8 weight multiplied by `factor`
    (same size, same name); returns the new weight."""
    model = onnx.load(path)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 4:
            weight = numpy_helper.to_array(tensor)
            new = np.clip(weight.astype(np.int32) * factor, -127, 127).astype(np.int8)
            tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
            onnx.save(model, path)
            return new
    raise AssertionError("no int8 weight")


def test_the_key_covers_the_bytes_and_the_options(cache, digits):
    path, x = digits
    before = qnnjit.compile(path, target="reference")(x)
    _with_scaled_weight(path, -1)  # same path, same size, other weights
    changed = qnnjit.compile(path, target="reference")
    assert _first_line(changed).startswith(COMPILED)
    assert not np.array_equal(changed(x), before)
    np.testing.assert_array_equal(changed(x), qnnjit.compile(onnx.load(path), "reference")(x))
    strict = qnnjit.compile(path, target="reference", strict_ranges=True)
    assert _first_line(strict).startswith(COMPILED)
    assert len(_entries(cache)) == 3


def test_a_damaged_entry_is_compiled_again(cache, digits):
    path, x = digits
    expected = qnnjit.compile(path, target="reference")(x)
    (entry,) = _entries(cache)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, somewhere in the pickled graph
    entry.write_bytes(bytes(data))
    again = qnnjit.compile(path, target="reference")
    assert _first_line(again).startswith(COMPILED)
    np.testing.assert_array_equal(again(x), expected)
    assert _first_line(qnnjit.compile(path, target="reference")).startswith(FROM_CACHE)


def test_a_compile_that_warns_is_not_stored_and_warns_every_time(cache, tmp_path):
    path = tmp_path / "wide.onnx"
    onnx.save(conv_integer_model(66000), path)  # its accumulator may leave int32
    for _ in range(2):
        with pytest.warns(AccumulatorOverflowWarning, match="'wide_conv'"):
            model = qnnjit.compile(path, target="reference")
        assert _first_line(model).startswith(COMPILED)
    assert _entries(cache) == []


def test_a_deprecation_warning_on_the_way_does_not_stop_the_store(cache, digits, monkeypatch):
    """A library imported during the compile may warn about its own code:
    given again, but the graph is stored."""
    path, _ = digits
    load_graph = api.load_graph

    def load_with_a_deprecation(*args):
        warnings.warn("an old API", DeprecationWarning, stacklevel=1)
        return load_graph(*args)

    monkeypatch.setattr(api, "load_graph", load_with_a_deprecation)
    with pytest.warns(DeprecationWarning, match="an old API"):
        qnnjit.compile(path, target="reference")
    assert len(_entries(cache)) == 1


@pytest.mark.parametrize(
    "env", [{"QNNJIT_GRAPH_CACHE": "0"}, {"QNNJIT_VERIFY": "1"}, {"QNNJIT_DUMP_IR": "ir"}]
)
def test_switches_that_bypass_the_cache(cache, digits, monkeypatch, tmp_path, env):
    path, _ = digits
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value) if name == "QNNJIT_DUMP_IR" else value)
    for _ in range(2):
        assert _first_line(qnnjit.compile(path, target="reference")).startswith(COMPILED)
    assert _entries(cache) == []


def test_every_disk_cache_off_means_no_key(monkeypatch, digits):
    monkeypatch.setenv("QNNJIT_CACHE_DIR", "")
    monkeypatch.setenv("QNNJIT_VERIFY", "0")
    assert graph_cache.key_for(digits[0], {}) is None


def test_a_model_with_external_data_is_never_stored(cache, digits, tmp_path):
    """Its weights live in a file the key does not hash: changing them must
    change the compiled model."""
    source, x = digits
    path = tmp_path / "external" / "model.onnx"
    path.parent.mkdir()
    model = onnx.load(source)
    onnx.save(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    first = qnnjit.compile(path, target="reference")
    assert _first_line(first).startswith(COMPILED)
    assert _entries(cache) == []
    # Change the weights in the external file only: same .onnx bytes.
    onnx_bytes = path.read_bytes()
    _with_scaled_weight(source, -1)
    onnx.save(onnx.load(source), tmp_path / "scratch.onnx", save_as_external_data=True,
              location="weights.bin", size_threshold=0)  # fmt: skip
    shutil.copyfile(tmp_path / "weights.bin", path.parent / "weights.bin")
    assert path.read_bytes() == onnx_bytes
    second = qnnjit.compile(path, target="reference")
    assert _first_line(second).startswith(COMPILED)
    np.testing.assert_array_equal(second(x), qnnjit.compile(onnx.load(source), "reference")(x))
    assert not np.array_equal(second(x), first(x))


def test_the_least_recently_used_entries_are_evicted(cache, digits, monkeypatch):
    path, _ = digits
    monkeypatch.setattr(graph_cache, "MAX_ENTRIES", 2)
    keys = []
    for strict in (False, True):
        qnnjit.compile(path, target="reference", strict_ranges=strict)
        keys.append(graph_cache.key_for(path, {"strict_ranges": strict}))
    oldest = cache / f"{keys[0]}.pkl"
    os.utime(oldest, ns=(1, 1))  # as if last used long ago
    qnnjit.compile(path.read_bytes(), target="reference")  # a hit on keys[0]: used again
    assert oldest.stat().st_mtime_ns > 1
    _with_scaled_weight(path, -1)
    qnnjit.compile(path, target="reference")  # a third entry: keys[1] is now the oldest
    names = {p.stem for p in _entries(cache)}
    assert len(names) == 2 and keys[0] in names and keys[1] not in names


_FRESH_PROCESS = """
import json, sys
import qnnjit
model = qnnjit.compile(sys.argv[1], target="reference")
print(json.dumps({"line": model.report().splitlines()[0], "onnx": "onnx" in sys.modules}))
"""


def test_a_fresh_process_hit_does_not_import_onnx(digits, tmp_path):
    """The point of the cache: no ONNX import (~0.05 s), no load, no passes."""
    path, _ = digits
    env = dict(os.environ, QNNJIT_CACHE_DIR=str(tmp_path / "cache"), QNNJIT_VERIFY="0")
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _FRESH_PROCESS, str(path)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"line": COMPILED, "onnx": True}
    assert runs[1]["line"].startswith(FROM_CACHE) and runs[1]["onnx"] is False

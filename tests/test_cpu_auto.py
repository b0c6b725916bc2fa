"""'auto' on the CPU: per op family of the model, the path that the tuning file's entry for this
CPU measured fastest (the official eager ops, 'reference' or 'sdpa'), for training and for
inference; the official path without an entry; explicit choices still win; the same logits."""
import json

import pytest
import torch

import cvt_fast.model as model_module
import cvt_fast.ops as ops
from cvt_fast.ops import backend as backend_module
from cvt_fast.ops import tuning
from cvt_fast.ops.backend import CPU_FAMILIES
from tiny_models import tiny_cvt
from tolerances import assert_close

CPU = "Test CPU 9000 64-Core Processor"
# The op (or model function) each family's fused path calls; the official path calls none of them.
FAMILY_CALLS = {"attention": ("attention",), "conv_proj": ("conv_proj", "conv_proj_bn"), "mlp": ("lean_mlp",),
                "residual_layer_norm": ("residual_layer_norm",)}


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch):
    monkeypatch.delenv(backend_module.ENV_VAR, raising=False)
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    ops.set_backend(None)
    yield
    ops.set_backend(None)


def write_entry(path, name=CPU, official=(1.0, 0.30), **paths):
    """A tuning file with one CPU entry; paths: family -> {path: (train_s, eval_s)}."""
    timings = {family: {p: {"train_s": t, "eval_s": e} for p, (t, e) in by_path.items()}
               for family, by_path in paths.items()}
    path.write_text(json.dumps({"schema": 1, "devices": {}, "cpus": {name: {
        "measured_utc": "2026-12-08T00:00:00+00:00", "threads": 2, "settings": {"model": "cvt-13", "batch": 4},
        "official": {"train_s": official[0], "eval_s": official[1]}, "timings": timings}}}))
    return path


def test_the_choice_follows_the_tuning_file_per_family_and_mode_and_a_near_miss_name_takes_nothing(tmp_path,
                                                                                                  monkeypatch):
    path = write_entry(tmp_path / "tuning.json",
                       attention={"reference": (1.2, 0.35), "sdpa": (0.9, 0.32)},   # sdpa trains faster
                       conv_proj={"reference": (1.1, 0.25)},                         # reference evaluates faster
                       mlp={"reference": (1.3, 0.40)})                               # official both ways
    monkeypatch.setenv(tuning.ENV_VAR, str(path))
    monkeypatch.setattr(backend_module, "cpu_name", lambda: CPU)
    chosen = {(family, training): backend_module.cpu_path(family, training)
              for family in CPU_FAMILIES for training in (True, False)}
    assert chosen == {("attention", True): "sdpa", ("attention", False): "official",
                      ("conv_proj", True): "official", ("conv_proj", False): "reference",
                      ("mlp", True): "official", ("mlp", False): "official",
                      ("residual_layer_norm", True): "official", ("residual_layer_norm", False): "official"}
    why = backend_module.cpu_choice("attention", True).reason
    assert CPU in why and "sdpa 0.900 s" in why and "official 1.000 s" in why
    # A family without timings, and a CPU of another name (a near miss too), take the official path.
    assert "no train timings of residual_layer_norm" in backend_module.cpu_choice("residual_layer_norm", True).reason
    for other in ("Test CPU 9000", CPU + " v2", "unknown CPU"):
        choice = backend_module.cpu_choice("attention", True, name=other)
        assert choice.backend == "official" and f"no CPU entry for {other!r}" in choice.reason
    # Another path must beat the official one by CPU_MARGIN (5%): 4% faster is within the noise.
    write_entry(path, mlp={"reference": (0.96, 0.20)})
    assert backend_module.cpu_path("mlp", True) == "official" and backend_module.cpu_path("mlp", False) == "reference"
    # A path that is not a candidate of its family is never taken, however fast.
    write_entry(path, conv_proj={"sdpa": (0.1, 0.1)})
    assert backend_module.cpu_path("conv_proj", True) == "official"


def test_cpu_name_reads_proc_cpuinfo():
    name = backend_module.cpu_name()
    assert isinstance(name, str) and name
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    assert f": {name}\n" in text


def test_the_choice_functions_are_constant_under_tracing():
    for fn in (backend_module.cpu_path, backend_module.auto_cpu_path):
        assert getattr(fn, "_dynamo_marked_constant", False) is True


def test_without_an_entry_for_this_cpu_auto_is_the_official_path(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, str(write_entry(tmp_path / "t.json", name="Another CPU",
                                                       attention={"sdpa": (0.1, 0.1)})))
    for family in CPU_FAMILIES:
        choice = backend_module.cpu_choice(family, True)
        assert choice.backend == "official" and "no CPU entry" in choice.reason and "official path" in choice.reason


@pytest.fixture
def calls(monkeypatch):
    """(name, backend argument) of every fused op the model calls."""
    seen = []

    def spy(name, function):
        def wrapper(*args, **kwargs):
            seen.append((name, kwargs.get("backend")))
            return function(*args, **kwargs)
        return wrapper

    for name in ("attention", "conv_proj", "conv_proj_bn", "residual_layer_norm"):
        monkeypatch.setattr(ops, name, spy(name, getattr(ops, name)))
    monkeypatch.setattr(model_module, "lean_mlp", spy("lean_mlp", model_module.lean_mlp))
    return seen


def force_paths(monkeypatch, train: dict, evaluate: dict):
    monkeypatch.setattr(backend_module, "cpu_path",
                        lambda family, training: (train if training else evaluate).get(family, "official"))


def run(model, training: bool):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model.train(training)
    if training:
        out = model(x)
        out.sum().backward()
        return out
    with torch.no_grad():
        return model(x)


def families_called(calls) -> dict:
    return {family: sorted({backend for name, backend in calls if name in names})
            for family, names in FAMILY_CALLS.items() if any(name in names for name, _ in calls)}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("family, path", [(f, p) for f, paths in CPU_FAMILIES.items() for p in paths if p != "official"])
def test_the_model_with_no_backend_runs_each_family_on_its_chosen_path(monkeypatch, calls, family, path, training):
    force_paths(monkeypatch, {family: path} if training else {}, {} if training else {family: path})
    run(tiny_cvt(backend=None), training)
    assert families_called(calls) == {family: [path]}


def test_every_family_official_calls_no_fused_op_and_gives_the_official_logits_bit_for_bit(monkeypatch, calls):
    force_paths(monkeypatch, {}, {})
    auto, official = tiny_cvt(backend=None), tiny_cvt(backend="official")
    for training in (True, False):
        assert torch.equal(run(auto, training), run(official, training))
    assert calls == []


def test_explicit_backends_still_win_over_the_cpu_choice(monkeypatch, calls):
    force_paths(monkeypatch, {}, {})  # auto would take no fused op at all
    run(tiny_cvt(backend="reference"), False)
    assert families_called(calls) == {f: ["reference"] for f in FAMILY_CALLS}
    calls.clear()
    run(tiny_cvt(backend=None).set_backend("reference"), False)
    assert families_called(calls) == {f: ["reference"] for f in FAMILY_CALLS}
    # The process default and the environment variable: the modules pass None and the ops resolve it.
    for set_default in (lambda: ops.set_backend("reference"), lambda: monkeypatch.setenv("CVT_FAST_BACKEND", "reference")):
        calls.clear()
        set_default()
        run(tiny_cvt(backend=None), False)
        assert families_called(calls) == {f: [None] for f in FAMILY_CALLS}
        assert all(ops.resolve_backend(n if n != "lean_mlp" else "linear_activation", None,
                                       torch.zeros(1)) == "reference" for n, _ in calls)
        ops.set_backend(None)
        monkeypatch.delenv("CVT_FAST_BACKEND", raising=False)
    # An attention-only backend for the model: SDPA for attention, the CPU's choice for the rest.
    calls.clear()
    force_paths(monkeypatch, {}, {"conv_proj": "reference"})
    run(tiny_cvt(backend="sdpa"), False)
    assert families_called(calls) == {"attention": ["sdpa"], "conv_proj": ["reference"]}


def test_a_direct_op_call_takes_the_cpu_choice_or_reference_where_it_is_the_official_path(monkeypatch):
    force_paths(monkeypatch, {"attention": "sdpa"}, {})
    monkeypatch.setattr(backend_module, "cpu_choice",
                        lambda family, training, name=None: backend_module.BackendChoice(
                            backend_module.cpu_path(family, training), "forced"))
    q = torch.randn(1, 4, 1, 8)
    assert ops.resolve_backend("attention", None, q) == "sdpa"
    assert ops.resolve_backend("attention", "reference", q) == "reference"  # per call
    with torch.no_grad():
        assert ops.resolve_backend("attention", None, q) == "reference"
    explained = ops.explain_backend("conv_proj", device="cpu", dtype=torch.float32)
    assert explained.backend == "reference" and "official path for conv_proj" in explained.reason


def test_explain_backend_says_the_cpu_choice_and_why():
    choice = ops.explain_backend("attention", device="cpu", dtype=torch.float32)
    assert "on this CPU" in choice.reason and backend_module.cpu_name() in choice.reason


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_auto_gives_the_official_logits_whatever_the_paths(monkeypatch, training):
    official = run(tiny_cvt(backend="official"), training)
    # The packaged evidence (this CPU's entry, or the official default), then every fused path at once.
    assert_close(run(tiny_cvt(backend=None), training), official)
    force_paths(monkeypatch, {"attention": "sdpa", "conv_proj": "reference", "mlp": "reference",
                              "residual_layer_norm": "reference"},
                {"attention": "reference", "conv_proj": "reference", "mlp": "reference",
                 "residual_layer_norm": "reference"})
    assert_close(run(tiny_cvt(backend=None), training), official)


def test_the_packaged_tuning_file_has_an_entry_for_this_projects_cpu():
    data = tuning.load_tuning(tuning.PACKAGED_FILE)
    assert data.get("cpus"), "run `python bench/tune.py --device cpu` and commit cvt_fast/ops/tuning.json"
    for name, entry in data["cpus"].items():
        assert entry["official"]["train_s"] > 0 and entry["official"]["eval_s"] > 0 and entry["threads"] >= 1
        assert set(entry["timings"]) == set(CPU_FAMILIES)
        for family, paths in entry["timings"].items():
            assert set(paths) == set(CPU_FAMILIES[family]) - {"official"}
        for family in CPU_FAMILIES:
            for training in (True, False):
                assert backend_module.cpu_choice(family, training, name=name).backend in CPU_FAMILIES[family]


"""bench/data.py: its --quick smoke run on a dozen small JPEGs, as a user runs it (seconds).

Checks the plan it starts with, every loader's rows with figures, the prepared copies, the
cores-per-GPU figure against a bench/model.py result, and the synthetic set's ImageNet-like size.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import data as data_bench  # noqa: E402
from test_bench import check_plan_and_progress, run_script  # noqa: E402


def test_data_quick_run_measures_every_loader_per_core_and_with_workers(tmp_path):
    model_result = tmp_path / "h100-model.json"
    model_result.write_text(json.dumps({
        "environment": {"device": "NVIDIA H100"}, "settings": {"dtype": "bfloat16"},
        "results": [{"impl": "cvt_fast-triton", "model": "cvt-13", "image_size": 224, "batch": 256, "mode": "train",
                     "status": "ok", "images_per_s": 3000.0},
                    {"impl": "official", "model": "cvt-13", "image_size": 224, "batch": 256, "mode": "train",
                     "status": "ok", "images_per_s": 1500.0},
                    {"impl": "cvt_fast-triton", "model": "cvt-13", "image_size": 224, "batch": 256, "mode": "infer",
                     "status": "ok", "images_per_s": 9000.0}]}))
    out = tmp_path / "data.json"
    payload, output = run_script("data.py", out, "--data-cache", str(tmp_path / "cache"),
                                 "--model-result", str(model_result), "--rounds", "2", timeout=300)
    assert payload["benchmark"] == "data" and payload["complete"] is True
    rows = payload["results"]
    ok = {(r["impl"], r["mode"]): r for r in payload["summary"] if r["status"] == "ok"}
    for name in ("decode", "torch", "torch-prepared-96"):
        for mode in data_bench.MODES:
            row = ok[(name, mode)]
            assert row["images"] >= 12 and row["images_per_s"] > 0 and row["seconds"] > 0
            assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / row["workers"])
            # Two rounds, every one kept in the results; the summary holds the best.
            rounds = [r for r in rows if (r["impl"], r["mode"]) == (name, mode)]
            assert sorted(r["round"] for r in rounds) == [0, 1]
            if mode == "workers":
                assert row["images_per_s"] == max(r["images_per_s"] for r in rounds)
            else:  # per image the fastest round: at least as fast as the best round as a whole
                assert row["per_image_best_of_rounds"] and len(rounds[0]["image_ms"]) == rounds[0]["images"]
                assert row["images_per_s"] >= max(r["images_per_s"] for r in rounds) * (1 - 1e-9)
    assert ok[("torch", "per-core")]["speedup_vs_torch"] == 1.0
    # The prepared copies are smaller files than the sources.
    assert ok[("torch-prepared-96", "per-core")]["mean_kb"] < ok[("torch", "per-core")]["mean_kb"]
    # Cores per GPU: the best training figure of cvt-13@224 (not inference, not the slower peer).
    assert payload["settings"]["model_result"]["images_per_s"] == 3000.0
    torch_row = ok[("torch", "per-core")]
    assert torch_row["cores_per_gpu"] == pytest.approx(3000.0 / torch_row["images_per_s"])
    assert "cores per GPU" in Path(payload["table_path"]).read_text()
    # dali-cpu: measured when nvidia-dali is installed, else listed with the reason.
    dali = [r for r in rows if r["impl"] == "dali-cpu"]
    assert dali and all(r["status"] in ("ok", "unavailable") for r in dali)
    assert all(r.get("reason") for r in dali if r["status"] == "unavailable")
    # The GPU path needs a GPU: on this CPU run it is listed, with why.
    assert {r["status"] for r in rows if r["impl"] == "dali-gpu"} == {"unavailable"}
    assert payload["implementations"]["dali-gpu"]["reason"]
    check_plan_and_progress(output, "data", rows,
                            lambda r: f"{r['impl']:>22} {r['mode']:>9}: {data_bench.common.fmt(r['images_per_s'])} "
                                      f"img/s ({data_bench.common.fmt(r['images_per_s_per_core'])} per core)")
    # The prepared copies and the synthetic set are kept for the next run.
    assert list((tmp_path / "cache").glob("prepared-96-q*/*/*.jpg"))


def test_synthetic_images_are_imagenet_sized_jpegs(tmp_path):
    import io

    import numpy as np

    rng = np.random.RandomState(0)
    sizes = []
    for _ in range(4):
        buf = io.BytesIO()
        data_bench.synthetic_image(rng, 500, 375).save(buf, "JPEG", quality=data_bench.SYNTHETIC_QUALITY)
        sizes.append(buf.tell())
    # ImageNet's average training JPEG is about 110 KB at about 400x350; a 500x375 one about 100 KB.
    assert 80_000 < sum(sizes) / len(sizes) < 130_000


def test_pick_files_spreads_over_classes_and_names_a_bad_folder(tmp_path):
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            (tmp_path / f"c{c}" / f"{i}.jpg").write_bytes(b"x")
    picked = data_bench.pick_files(tmp_path, 5)
    assert [label for _, label in picked] == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="not a folder"):
        data_bench.pick_files(tmp_path / "missing", 5)
    with pytest.raises(ValueError, match="no class folders"):
        data_bench.pick_files(tmp_path / "c0", 5)


def test_model_train_rate_ignores_other_models_and_failed_rows(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"results": [
        {"impl": "a", "model": "cvt-21", "image_size": 224, "mode": "train", "status": "ok", "images_per_s": 9e9},
        {"impl": "b", "model": "cvt-13", "image_size": 224, "mode": "train", "status": "oom"},
        {"impl": "c", "model": "cvt-13", "image_size": 224, "mode": "train", "status": "ok", "images_per_s": 10.0}]}))
    assert data_bench.model_train_rate(path)["impl"] == "c"
    path.write_text(json.dumps({"results": []}))
    assert data_bench.model_train_rate(path) is None

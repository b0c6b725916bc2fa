"""The inference path (cvt_fast/inference.py): the eval model's logits, BatchNorm folded once,
clear errors; CUDA-graph capture and replay on a GPU (marked `gpu`: skipped on the CPU)."""
import copy

import pytest
import torch

import cvt_fast
from cvt_fast.inference import InferenceModel, inference_model
from cvt_fast.model import Attention
from test_train_utils import one_thread  # noqa: F401  (fixture)
from tiny_models import randomize_batch_norms, tiny_cvt
from tolerances import assert_close


def eval_logits(model, images):
    with torch.no_grad():
        return copy.deepcopy(model).eval()(images)


def official_logits(model, images):
    official = copy.deepcopy(model).set_backend("official").eval()
    with torch.no_grad():
        return official(images)


def folds_stored(model):
    return [m._folded_bn.is_filled for m in model.modules() if isinstance(m, Attention)]


def test_inference_model_gives_the_eval_models_logits_on_the_cpu():
    model = tiny_cvt().train()  # inference_model switches it to eval
    images = torch.randn(3, 3, 32, 32)
    fast = cvt_fast.inference_model(model, images[:1])
    assert isinstance(fast, InferenceModel) and not model.training and not fast.training
    assert all(folds_stored(model))  # the example input folded BatchNorm already
    logits = fast(images)
    assert torch.equal(logits, eval_logits(model, images))
    assert_close(logits, official_logits(model, images))
    assert not logits.requires_grad and fast.graph_count == 0  # no graphs on the CPU


def test_inference_model_follows_weight_changes_and_other_shapes():
    model = tiny_cvt(seed=0)
    fast = inference_model(model)
    images = torch.randn(2, 3, 32, 32)
    fast(images)
    model.load_state_dict(tiny_cvt(seed=1).state_dict())
    assert_close(fast(images), official_logits(model, images))
    other = torch.randn(1, 3, 40, 48)
    assert_close(fast(other), official_logits(model, other))


def test_inference_model_runs_under_autocast_like_the_eval_model():
    model = tiny_cvt()
    images = torch.randn(2, 3, 32, 32)
    fast = inference_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = fast(images)
        expected = eval_logits(model, images)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, expected)


def test_inference_model_errors_name_the_problem_and_the_fix():
    model = tiny_cvt()
    fast = inference_model(model)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fast([[0.0]])
    with pytest.raises(TypeError, match=r"float64 but the model's weights are torch.float32.*x.to\(torch.float32\)"):
        fast(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        fast(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"input is on meta but the model is on cpu.*x.to\('cpu'\)"):
        fast(torch.randn(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device.*cuda_graphs=False"):
        inference_model(model, cuda_graphs=True)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        inference_model("cvt-13")
    with pytest.raises(TypeError, match="already an InferenceModel"):
        inference_model(fast)
    with pytest.raises(RuntimeError, match="eval mode only"):
        fast.train()
    fast.eval()  # eval() is train(False): allowed, as evaluation loops call it


def test_inference_model_recaptures_nothing_on_the_cpu_even_with_graphs_off():
    model = tiny_cvt()
    fast = inference_model(model, cuda_graphs=False)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(fast(images), eval_logits(model, images))
    assert fast.graph_count == 0


def test_test_cli_evaluates_through_the_inference_path(tmp_path, one_thread):
    from test_train_utils import load_tiny_config, make_dataset

    from cvt_fast.model import build_model_from_config
    from cvt_fast.test import evaluate_config

    data = make_dataset(tmp_path / "data", classes=3, train_per_class=1, val_per_class=4)
    eager_cfg = load_tiny_config(data, tmp_path / "out")
    fast_cfg = load_tiny_config(data, tmp_path / "out", TEST__INFERENCE_PATH="inference_model")
    model_file = tmp_path / "weights.pth"
    torch.save(randomize_batch_norms(build_model_from_config(eager_cfg)).state_dict(), model_file)
    eager = evaluate_config(eager_cfg, str(model_file))
    fast = evaluate_config(fast_cfg, str(model_file))
    assert fast["images"] == eager["images"] == 12
    assert fast["top1"] == eager["top1"] and fast["loss"] == pytest.approx(eager["loss"], rel=1e-6)
    bad_cfg = load_tiny_config(data, tmp_path / "out", TEST__INFERENCE_PATH="graphs")
    with pytest.raises(ValueError, match="TEST.INFERENCE_PATH='graphs'; expected 'eager' or 'inference_model'"):
        evaluate_config(bad_cfg, str(model_file))


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
def test_cuda_graph_path_matches_eager_recaptures_per_shape_and_after_weight_changes():
    model = tiny_cvt().cuda()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    fast = inference_model(model, images, cuda_graphs=True)
    assert fast.graph_count == 1
    for _ in range(2):  # replays
        assert_close(fast(images), eval_logits(model, images), factor=10)
    assert_close(fast(images), official_logits(model, images), factor=10)
    # A new shape: a second graph; the first still replays correctly afterwards.
    small = torch.randn(1, 3, 40, 32, device="cuda")
    assert_close(fast(small), eval_logits(model, small), factor=10)
    assert fast.graph_count == 2
    assert_close(fast(images), eval_logits(model, images), factor=10)
    # Weight changes (in place: load_state_dict) are seen: graphs are dropped and re-captured.
    model.load_state_dict(tiny_cvt(seed=5).state_dict())
    assert_close(fast(images), official_logits(model, images), factor=10)
    assert fast.graph_count == 1
    # The returned logits are a copy unless asked otherwise.
    first = fast(images)
    second = fast(images * 2)
    assert not torch.equal(first, second)
    buffered = inference_model(model, images, clone_output=False)
    assert buffered(images).data_ptr() == buffered(images).data_ptr()


@pytest.mark.gpu
def test_cuda_graph_path_under_bf16_autocast_and_its_errors():
    model = tiny_cvt().cuda()
    images = torch.randn(8, 3, 32, 32, device="cuda")
    fast = inference_model(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = fast(images)
        expected = eval_logits(model, images)
    assert logits.dtype == torch.bfloat16
    assert_close(logits, expected, dtype=torch.bfloat16, factor=2)
    # The float32 graph (another key) and the bf16 one coexist, each with its own folded weights.
    assert_close(fast(images), eval_logits(model, images), factor=10)
    assert fast.graph_count == 2
    with pytest.raises(ValueError, match="input is on cpu but the model is on cuda"):
        fast(images.cpu())
    with pytest.raises(TypeError, match="float16 but the model's weights are torch.float32"):
        fast(images.half())


@pytest.mark.gpu
def test_compile_reduce_overhead_recipe_matches_eager():
    model = tiny_cvt().cuda()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            logits = compiled(images)
        assert_close(logits, eval_logits(model, images), factor=10)
        model.stage1.blocks[0].attn.conv_proj_q.bn.running_var.mul_(2.0)
        assert_close(compiled(images).clone(), eval_logits(model, images), factor=10)
    torch._dynamo.reset()

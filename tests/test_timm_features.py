"""CvT as a backbone, timm's way (cvt_fast/model.py, cvt_fast/timm_models.py): feature_info,
forward_intermediates, prune_intermediate_layers, features_only=True through timm's feature getter,
and timm's fx feature extraction; each checked against the stage outputs of the plain forward,
under every backend this machine runs."""
import pytest
import torch

from cvt_fast.model import MODEL_BACKENDS, build_model
from cvt_fast.ops.backends import TABLE
from tiny_models import randomize_batch_norms, stage_outputs
from tiny_spec import tiny_spec

timm = pytest.importorskip("timm")

NAMES = ["cvt_13", "cvt_13_384", "cvt_21", "cvt_21_384", "cvt_w24_384"]
WIDTHS = {"cvt_13": [64, 192, 384], "cvt_21": [64, 192, 384], "cvt_w24": [192, 768, 1024]}


def _runs_on_cpu(backend):
    if backend in ("official", "auto"):
        return True
    record = TABLE[backend]
    return all(record.probe(op, "cpu") is None for op in record.ops)


# 'auto' is the model's None; triton joins under TRITON_INTERPRET=1, the CUDA kernels on a GPU machine.
CPU_BACKENDS = [None if b == "auto" else b for b in MODEL_BACKENDS if _runs_on_cpu(b)]



def tiny(backend, cls_token=True):
    torch.manual_seed(0)
    spec = tiny_spec(CLS_TOKEN=[False, False, cls_token])
    return randomize_batch_norms(build_model(spec, num_classes=5, backend=backend)).eval()


@pytest.mark.parametrize("name", NAMES)
def test_feature_info_names_the_three_stages_of_every_registered_model(name):
    with torch.device("meta"):  # structure only
        model = timm.create_model(name)
    widths = WIDTHS[name.rsplit("_384", 1)[0]]
    assert [f["num_chs"] for f in model.feature_info] == widths
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16]
    assert [f["module"] for f in model.feature_info] == ["stage0", "stage1", "stage2"]


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=str)
@pytest.mark.parametrize("cls_token", [True, False], ids=["cls", "no_cls"])
def test_forward_intermediates_are_the_stage_outputs_of_the_plain_forward(backend, cls_token):
    model = tiny(backend, cls_token)
    x = torch.randn(2, 3, 61, 47)
    with torch.no_grad():
        _, stages = stage_outputs(model, x)
        grids = [grid for grid, _ in stages]
        assert [g.shape[1] for g in grids] == [f["num_chs"] for f in model.feature_info]
        assert [g.shape[-2:] for g in grids] == [(15, 12), (8, 6), (4, 3)]

        final, maps = model.forward_intermediates(x)
        assert all(torch.equal(m, g) for m, g in zip(maps, grids)) and len(maps) == 3
        assert torch.equal(final, model.forward_features(x))
        maps = model.forward_intermediates(x, indices=2, intermediates_only=True)  # the last two
        assert len(maps) == 2 and torch.equal(maps[0], grids[1]) and torch.equal(maps[1], grids[2])
        maps = model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True, output_fmt="NHWC")
        assert torch.equal(maps[0], grids[0].permute(0, 2, 3, 1)) and torch.equal(maps[1], grids[2].permute(0, 2, 3, 1))

        # norm: the final LayerNorm on the last stage (the only one of its width), as forward_features has it.
        maps = model.forward_intermediates(x, norm=True, intermediates_only=True, return_prefix_tokens=True)
        tokens = model.forward_features(x)
        prefix = model.num_prefix_tokens
        last_map, last_prefix = maps[-1]
        assert torch.equal(last_map.flatten(2).transpose(1, 2), tokens[:, prefix:])
        assert torch.equal(last_prefix, tokens[:, :prefix]) and last_prefix.shape == (2, prefix, 48)
        assert torch.equal(maps[0][0], grids[0]) and maps[0][1].shape == (2, 0, 16)
        if cls_token:
            _, raw_cls = stages[-1]
            raw = model.forward_intermediates(x, indices=[2], intermediates_only=True, return_prefix_tokens=True)
            assert torch.equal(raw[0][1], raw_cls)


def test_stop_early_runs_no_stage_after_the_last_asked_for():
    model = tiny("reference")
    x = torch.randn(1, 3, 64, 64)
    ran = []
    for i, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert ran == [0] and maps[0].shape == (1, 16, 16, 16)
        ran.clear()
        final, maps = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert ran == [0, 1] and final.shape == (1, 8 * 8, 32)  # stage 1's tokens, not normalised
        assert torch.equal(final, maps[0].flatten(2).transpose(1, 2))


@pytest.mark.parametrize("indices, message", [(0, "must be 1..3"), (4, "must be 1..3"), ([3], r"\[-3, 2\]"),
                                              ([], "is empty")])
def test_bad_indices_are_refused(indices, message):
    model = tiny("reference")
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), indices=indices)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), output_fmt="NLC")


def test_prune_intermediate_layers_drops_the_later_stages_norm_and_head():
    model = tiny("reference")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        grids = [g for g, _ in stage_outputs(model, x)[1]]
        assert model.prune_intermediate_layers([0, -2]) == [0, 1]
        assert model.num_stages == 2 and not hasattr(model, "stage2")
        assert not any(k.startswith(("stage2.", "norm.", "head.")) for k in model.state_dict())
        assert [f["num_chs"] for f in model.feature_info] == [16, 32]
        maps = model.forward_intermediates(x, intermediates_only=True)
        assert torch.equal(maps[0], grids[0]) and torch.equal(maps[1], grids[1])
    full = tiny("reference")
    assert full.prune_intermediate_layers(3, prune_head=False) == [0, 1, 2]
    assert full.num_stages == 3 and isinstance(full.head, torch.nn.Linear) and isinstance(full.norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_gives_the_stage_maps_of_every_registered_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0).eval()
    backbone = timm.create_model(name, features_only=True).eval()
    assert backbone.feature_info.channels() == [f["num_chs"] for f in model.feature_info]
    assert backbone.feature_info.reduction() == [4, 8, 16]
    loaded = backbone.model.load_state_dict(model.state_dict(), strict=False)
    # FeatureGetterNet pruned the final LayerNorm and the head (norm=False: the maps are the raw stages).
    assert not loaded.missing_keys and {k.split(".")[0] for k in loaded.unexpected_keys} == {"norm"}
    x = torch.randn(1, 3, 48, 40)  # tiny input: CvT has no position embedding, any size runs
    with torch.no_grad():
        grids = [g for g, _ in stage_outputs(model, x)[1]]
        features = backbone(x)
    assert len(features) == 3 and all(torch.equal(f, g) for f, g in zip(features, grids))
    # out_indices prunes what no output needs: here the last stage, the final LayerNorm and the head.
    with torch.device("meta"):  # structure only
        two = timm.create_model(name, features_only=True, out_indices=(0, 1))
    assert two.feature_info.channels() == [f["num_chs"] for f in model.feature_info][:2]
    assert not any(k.startswith(("model.stage2.", "model.norm.", "model.head.")) for k in two.state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=str)
def test_timms_feature_getter_under_every_backend_matches_the_plain_forward(backend):
    # What features_only=True builds (test above), around a tiny CvT: the Triton kernels run here
    # through the interpreter, too slow for CvT-13.
    from timm.models._features import FeatureGetterNet

    x = torch.randn(2, 3, 40, 56)
    model = tiny(backend)
    backbone = FeatureGetterNet(tiny(backend), out_indices=(0, -1)).eval()
    assert backbone.feature_info.channels() == [16, 48] and backbone.feature_info.reduction() == [4, 16]
    with torch.no_grad():
        grids = [g for g, _ in stage_outputs(model, x)[1]]
        features = backbone(x)
    assert len(features) == 2 and torch.equal(features[0], grids[0]) and torch.equal(features[1], grids[2])


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_timm_fx_feature_extraction_traces_the_model(train):
    # What timm's fx test does: every node named, the last one extracted, the same output exactly.
    from timm.models import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = timm.create_model("cvt_13", num_classes=7).train(train)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert {"stage0", "stage2.blocks", "norm", "head"} <= {n.split(".getitem")[0] for n in eval_nodes} | set(eval_nodes)
    nodes = train_nodes if train else eval_nodes
    extractor = create_feature_extractor(model, return_nodes=[nodes[-1]])
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    (got,) = extractor(x).values()
    assert torch.equal(got, expected)
    # A stage's blocks are one leaf: their output is a node a detection neck can take.
    blocks = create_feature_extractor(model.eval(), return_nodes={"stage1.blocks": "tokens"})
    assert blocks(x)["tokens"].shape == (2, 8 * 8, 192)


def test_torch_jit_script_is_refused_with_the_routes_that_work():
    model = tiny("reference")
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.jit.trace.*torch.export"):
        torch.jit.script(model)


def test_forward_intermediates_match_forward_features_with_grad_checkpointing():
    # timm's intermediates check: the same final tokens with and without checkpointed blocks.
    model = tiny("reference")
    x = torch.randn(2, 3, 48, 48)
    final, maps = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    model.set_grad_checkpointing()
    checkpointed, again = model.forward_intermediates(x)
    assert torch.equal(checkpointed, final) and all(torch.equal(a, b) for a, b in zip(again, maps))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cvt_13", "cvt_21", "cvt_w24_384"])  # the three architectures
def test_every_parameter_gets_a_gradient_through_timm_and_through_fx(name):
    from timm.models import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42).train()
    x = torch.randn(2, 3, 32, 32)
    for module in (model, create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[0][-1]])):
        model.zero_grad(set_to_none=True)
        out = module(x)
        out = out if isinstance(out, torch.Tensor) else next(iter(out.values()))
        assert out.shape == (2, 42)
        out.mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing

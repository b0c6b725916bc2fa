"""Export (cvt_fast/export.py): torch.export keeps the custom ops and matches eager at other batch
sizes; ONNX (ops lowered through the reference) runs in onnxruntime with PyTorch's logits.

Exports are slow on a 2-core CPU (measured there, CPU time: the tiny CvT ~10 s to torch.export,
~20 s more to lower, ~30 s to ONNX; CvT-13 ~70 s per image size), so the tiny model carries most
checks and CvT-13 is exported twice (224 through the command line, 384 through the function).
"""
import copy
import re

import pytest
import torch

import cvt_fast
from cvt_fast import export
from tiny_models import randomize_batch_norms, tiny_cvt

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

# The bar for onnxruntime against PyTorch in float32 (relative).
ONNX_TOLERANCE = 1e-4


def eager_logits(model, images):
    with torch.no_grad():
        return copy.deepcopy(model).eval()(images)


def cvt_ops_in(program):
    return sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and "cvt_fast" in str(n.target)})


@pytest.fixture(scope="module")
def tiny_program():
    model = tiny_cvt()
    return model, export.export_program(model, image_size=32)


def test_torch_export_keeps_the_custom_ops_and_matches_eager_at_any_batch_size(tiny_program, tmp_path):
    model, program = tiny_program
    # The fused block ops (fc1 + activation, residual + LayerNorm) are custom ops too.
    assert cvt_ops_in(program) == ["cvt_fast.attention.default", "cvt_fast.conv_proj.default",
                                   "cvt_fast.linear_activation.default", "cvt_fast.residual_layer_norm.default"]
    # The BatchNorm fold is traced from the parameters and statistics, not baked in as constants.
    assert not program.constants
    assert any("running_var" in name for name in program.graph_signature.buffers)
    for batch in (1, 2, 5):
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(program.module()(images), eager_logits(model, images), rtol=1e-5, atol=1e-6)
    # A saved program loads back (the ops are registered by importing cvt_fast.ops) and runs.
    torch.export.save(program, tmp_path / "tiny.pt2")
    loaded = torch.export.load(tmp_path / "tiny.pt2")
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.module()(images), eager_logits(model, images), rtol=1e-5, atol=1e-6)


def test_lowered_program_has_only_standard_operators_and_the_same_logits(tiny_program):
    model, program = tiny_program
    lowered = export.lower_custom_ops(program)
    assert cvt_ops_in(lowered) == []
    # Every forward op the package registers has a decomposition (a new op would otherwise only
    # fail at ONNX export time). The CUDA extension's own ops (`*_cuda`, registered once cvt_fast._C
    # is loaded) are the cuda backend's kernels, called inside these ops, never traced.
    forward_ops = {name for name in dir(torch.ops.cvt_fast)
                   if not name.endswith(("backward", "_cuda")) and not name.startswith("_")
                   and isinstance(getattr(torch.ops.cvt_fast, name), torch._ops.OpOverloadPacket)}
    assert forward_ops - {"activation_grad_through_linear"} <= {str(op).split(".")[1] for op in export.reference_decompositions()}
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(lowered.module()(images), eager_logits(model, images), rtol=1e-5, atol=1e-6)


def onnx_error(path, model, image_size, batches=(1, 3)):
    """Largest relative error of onnxruntime's logits over random batches of these sizes (one session)."""
    return export.check_onnx(path, model, [torch.randn(b, 3, image_size, image_size) for b in batches])


def test_onnx_file_of_the_tiny_model_runs_in_onnxruntime_with_a_dynamic_batch(tmp_path):
    model = tiny_cvt()
    path = export.export_onnx(model, tmp_path / "tiny.onnx", image_size=40)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert not {n.domain for n in proto.graph.node} - {"", "ai.onnx"}  # standard operators only
    assert {"Conv", "MatMul"} <= {n.op_type for n in proto.graph.node}
    (images,), (logits,) = proto.graph.input, proto.graph.output
    assert (images.name, logits.name) == ("images", "logits")
    assert [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim] == ["batch", 3, 40, 40]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 5]
    error = onnx_error(path, model, 40, batches=(1, 2, 7))
    assert error < 1e-5  # a tiny model: far inside the bar


def test_export_errors_name_the_problem(tmp_path):
    model = tiny_cvt()
    with pytest.raises(ValueError, match="must end in .onnx"):
        export.export_onnx(model, tmp_path / "tiny.pb", image_size=32)
    with pytest.raises(ValueError, match="does not exist"):
        export.export_onnx(model, tmp_path / "missing" / "tiny.onnx", image_size=32)
    with pytest.raises(ValueError, match="batch size 1; use >= 2 for a dynamic batch"):
        export.export_program(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export.export_program("cvt-13")
    assert export.main(["--model", "cvt-13", "--out", str(tmp_path / "x.bin")]) == 2


@pytest.mark.slow
def test_cvt13_onnx_at_224_from_the_command_line_matches_pytorch(tmp_path, capsys):
    model = randomize_batch_norms(cvt_fast.create_model("cvt-13")).eval()
    checkpoint = tmp_path / "cvt13.pth"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "cvt13.onnx"
    code = export.main(["--model", "cvt-13", "--image-size", "224", "--out", str(out),
                        "--checkpoint", str(checkpoint), "--check"])
    printed = capsys.readouterr().out
    assert code == 0 and f"wrote {out.resolve()}" in printed, printed
    # --check ran onnxruntime on batches of 1 and 3 (the export's example had 2) with the loaded weights.
    error = float(re.search(r"relative error (\S+)", printed).group(1))
    print(f"CvT-13 at 224: onnxruntime vs PyTorch relative error {error:.2e}")
    assert error < ONNX_TOLERANCE


@pytest.mark.slow
def test_cvt13_onnx_at_384_matches_pytorch_with_a_dynamic_batch(tmp_path):
    model = randomize_batch_norms(cvt_fast.create_model("cvt-13")).eval()
    path = export.export_onnx(model, tmp_path / "cvt13_384.onnx", image_size=384)
    error = onnx_error(path, model, 384, batches=(1, 3))
    print(f"CvT-13 at 384: onnxruntime vs PyTorch relative error {error:.2e}")
    assert error < ONNX_TOLERANCE


# --------------------------------------------------------------------------- the standard routes
# torch.jit.trace and torch.onnx.export (both exporters) on the model as it is, default backend:
# while they record it, the model takes its official path (plain aten operators, same function).

STANDARD_ROUTE_TOLERANCE = 1e-5  # relative, float32 (issue 24)


def relative_error(got, expected):
    got, expected = torch.as_tensor(got).double(), expected.double()
    return ((got - expected).norm() / expected.norm()).item()


def test_torch_jit_trace_of_the_default_model_gives_its_logits():
    model = tiny_cvt(backend=None)
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        traced = torch.jit.trace(model, images)
        other = torch.randn(2, 3, 40, 40)  # not the traced example: the trace is a graph, not a cache
        assert relative_error(traced(other), model(other)) < STANDARD_ROUTE_TOLERANCE
    # No cvt_fast op in the trace: it runs wherever TorchScript runs.
    assert "cvt_fast::" not in str(traced.inlined_graph)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_torch_onnx_export_of_the_default_model_runs_in_onnxruntime(tmp_path, dynamo):
    model = tiny_cvt(backend=None)
    images = torch.randn(2, 3, 40, 40)
    path = str(tmp_path / "tiny.onnx")
    torch.onnx.export(model, (images,), path, dynamo=dynamo, input_names=["images"], output_names=["logits"])
    proto = onnx.load(path)
    assert not {n.domain for n in proto.graph.node} - {"", "ai.onnx"}  # standard operators only
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": images.numpy()})
    assert relative_error(got, eager_logits(model, images)) < STANDARD_ROUTE_TOLERANCE
    # The eager model is still on its fused path afterwards (the switch lasts only while exporting).
    assert cvt_ops_in(export.export_program(model, image_size=32)) != []


@pytest.mark.parametrize("use_dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
def test_timms_onnx_export_of_cvt13_runs_in_onnxruntime(tmp_path, use_dynamo):
    timm = pytest.importorskip("timm")
    from timm.utils.onnx import onnx_export

    torch.manual_seed(0)
    model = randomize_batch_norms(timm.create_model("cvt_13", num_classes=10))
    path = str(tmp_path / "cvt13.onnx")
    images = torch.randn(2, 3, 64, 64)
    # What timm's onnx_export.py calls (its defaults: checker on, batch dimension dynamic).
    onnx_export(model, path, example_input=images, use_dynamo=use_dynamo, input_names=["images"],
                output_names=["logits"])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (images, torch.randn(3, 3, 64, 64)):
        (got,) = session.run(["logits"], {"images": batch.numpy()})
        assert relative_error(got, eager_logits(model, batch)) < STANDARD_ROUTE_TOLERANCE


def test_export_command_reads_timm_training_checkpoints(tmp_path, capsys):
    import argparse

    model = randomize_batch_norms(cvt_fast.create_model("cvt-13", num_classes=10))
    # timm's train.py layout: the command line as an argparse.Namespace beside the weights.
    checkpoint = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "cvt_13", "state_dict": model.state_dict(), "optimizer": {}, "version": 2,
                "args": argparse.Namespace(model="cvt_13", lr=5e-4, mean=(0.485, 0.456, 0.406), amp=True),
                "metric": 71.5}, checkpoint)
    out = tmp_path / "cvt13.pt2"
    code = export.main(["--model", "cvt-13", "--num-classes", "10", "--image-size", "32", "--out", str(out),
                        "--checkpoint", str(checkpoint)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "model_best.pth.tar" in printed.out and out.exists()
    program = torch.export.load(out)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(program.module()(images), eager_logits(model, images), rtol=1e-5, atol=1e-6)
    # Only Namespace is trusted: another class in the file is still refused, naming it.
    torch.save({"state_dict": model.state_dict(), "args": argparse.Action(["--lr"], "lr")}, checkpoint)
    assert export.main(["--model", "cvt-13", "--num-classes", "10", "--image-size", "32", "--out", str(out),
                        "--checkpoint", str(checkpoint)]) == 2
    assert "argparse.Action" in capsys.readouterr().err

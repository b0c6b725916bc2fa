"""The inference path: one call from a trained CvT to a model that serves logits fast.

    fast = cvt_fast.inference_model(model, example_input)     # example_input is optional
    logits = fast(images)                                     # same logits as model.eval()(images)

`inference_model` puts the model in eval mode and folds each conv_proj's BatchNorm into its
convolution weights once (cvt_fast/batch_norm_fold.py keeps the folded tensors until a weight
or running statistic changes). On a GPU it also captures the whole forward in a CUDA graph per
input shape, dtype, autocast dtype and backend choice (`graph_key`): at small batch a CvT
forward is hundreds of small kernel launches, and a graph replay issues them all at once. A new shape captures a new graph (each
with its own memory pool: about one forward's activations per shape); `reset()` drops them.

The graph path copies each batch into a static input buffer and returns a copy of the static
output (clone_output=False returns the buffer itself, overwritten by the next call of that
shape). The graphs read the parameters in place; before each replay the wrapper compares the
version counters and storages of all parameters and buffers with those at capture time
(check_weights=True) and re-captures after a change (an optimizer step, load_state_dict,
.to()). Replacing parameter objects outright (load_state_dict(assign=True), setattr) is not
seen: call reset() after that. Under torch.autocast the graph is captured under the same
autocast dtype (with autocast's weight-cast cache off, as graph capture requires).

Alternative with the same effect, through the compiler (inductor + CUDA graphs; the BatchNorm
fold then runs inside the compiled graph, fused by inductor):

    fast = torch.compile(model.eval(), mode="reduce-overhead", fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = fast(images)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from cvt_fast.batch_norm_fold import FoldedWeights
from cvt_fast.ops.backend import get_backend

__all__ = ["InferenceModel", "inference_model", "GraphKey", "graph_key"]


@dataclass
class _CapturedForward:
    graph: "torch.cuda.CUDAGraph"
    static_input: Tensor
    static_output: Tensor
    # The folded conv weights the graph reads: kept alive here even if the model's cache moves on
    # (another dtype, another autocast state) while this graph may still be replayed.
    folded: list[FoldedWeights]


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class GraphKey(NamedTuple):
    """What a captured forward depends on besides the weights (those are watched apart, see
    InferenceModel._weights_changed): a graph is replayed only for a call with the same key."""
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    autocast_dtype: Optional[torch.dtype]  # None: autocast off for the input's device type
    backend: str  # the process-wide choice (set_backend / CVT_FAST_BACKEND): it picks the kernels captured


def graph_key(x: Tensor) -> GraphKey:
    """The cache key of the CUDA graph for a call on input x, in the calling context (autocast, backend).
    A pure function of the call, so that what it keys on is testable without a GPU. The input's
    strides are not in it: the graph reads a contiguous copy of x."""
    return GraphKey(tuple(x.shape), x.dtype, x.device, _autocast_dtype(x.device), get_backend())


class InferenceModel(nn.Module):
    """An eval-only CvT wrapper: BatchNorm folded once, CUDA-graph replay per input shape on a GPU.

    Build it with `inference_model(...)`; the wrapped model is `.model`.
    """

    def __init__(self, model: nn.Module, cuda_graphs: Optional[bool] = None, check_weights: bool = True,
                 clone_output: bool = True, warmup_steps: int = 2):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a cvt_fast CvT), got {type(model).__name__}")
        if isinstance(model, InferenceModel):
            raise TypeError("model is already an InferenceModel; pass its .model to build another")
        if hasattr(model, "_orig_mod"):
            raise TypeError("model is a torch.compile'd module; pass the plain model (model._orig_mod): "
                            "inference_model captures CUDA graphs itself")
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True, False or None (automatic), got {cuda_graphs!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.model = model.eval()
        self.training = False
        self.cuda_graphs = cuda_graphs
        self.check_weights = check_weights
        self.clone_output = clone_output
        self.warmup_steps = warmup_steps
        self._graphs: dict[GraphKey, _CapturedForward] = {}
        self._snapshot_weights()
        if cuda_graphs and self._device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, but it is on {self._device}; "
                             "move it with model.cuda() first, or pass cuda_graphs=False")

    # -- mode -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "InferenceModel":
        if mode:
            raise RuntimeError("an InferenceModel runs in eval mode only; train the wrapped model "
                               "(.model) and build a new InferenceModel (or call reset()) afterwards")
        return super().train(False)

    def reset(self) -> None:
        """Drop every captured graph and re-read the weights (after replacing parameter objects)."""
        self._graphs.clear()
        self._snapshot_weights()

    @property
    def graph_count(self) -> int:
        """How many CUDA graphs (input shapes x dtypes x autocast dtypes) are captured."""
        return len(self._graphs)

    # -- the call ---------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of an image batch (B, C, H, W) on the model's device."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected an image batch as a torch.Tensor, got {type(x).__name__}")
        if self.check_weights and self._weights_changed():
            self.reset()
        self._check_input(x)
        use_graphs = self.cuda_graphs if self.cuda_graphs is not None else x.is_cuda
        if not use_graphs:
            with torch.no_grad():
                return self.model(x)
        key = graph_key(x)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(x, key.autocast_dtype)
            except RuntimeError as error:
                raise RuntimeError(f"capturing the forward in a CUDA graph failed for input shape {tuple(x.shape)} "
                                   f"({type(error).__name__}: {error}); pass cuda_graphs=False to run without "
                                   "graphs") from error
            self._graphs[key] = captured
        captured.static_input.copy_(x)
        captured.graph.replay()
        return captured.static_output.clone() if self.clone_output else captured.static_output

    def _check_input(self, x: Tensor) -> None:
        if x.device != self._device:
            raise ValueError(f"the input is on {x.device} but the model is on {self._device}; "
                             f"move the batch with x.to({str(self._device)!r})")
        if not x.is_floating_point():
            raise TypeError(f"the input has dtype {x.dtype}; expected a floating-point image batch "
                            f"({self._dtype}): convert and normalise it first")
        if _autocast_dtype(x.device) is None and x.dtype != self._dtype:
            raise TypeError(f"the input has dtype {x.dtype} but the model's weights are {self._dtype}; "
                            f"convert with x.to({self._dtype}) (or run under torch.autocast)")

    # -- weights ----------------------------------------------------------------------
    def _tensors(self) -> list[Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]

    def _snapshot_weights(self) -> None:
        tensors = self._tensors()
        floating = [t for t in tensors if t.is_floating_point()]
        self._device = tensors[0].device if tensors else torch.device("cpu")
        self._dtype = floating[0].dtype if floating else torch.get_default_dtype()
        self._watched = tensors
        self._versions = [t._version for t in tensors]
        self._storages = [t.data_ptr() for t in tensors]

    def _weights_changed(self) -> bool:
        # Two flat comparisons before every call (about 0.35 ms for CvT-13's 459 tensors, measured on
        # a loaded 2-core CPU); a graph replay runs asynchronously on the GPU meanwhile.
        return ([t._version for t in self._watched] != self._versions
                or [t.data_ptr() for t in self._watched] != self._storages)

    # -- CUDA graphs ------------------------------------------------------------------
    def _capture(self, x: Tensor, amp_dtype: Optional[torch.dtype]) -> _CapturedForward:
        """Capture the forward for inputs shaped like x (docs: torch.cuda.graph, 'whole network capture')."""
        def amp():
            # Autocast's cast cache would hand the graph tensors from outside it: off during capture.
            if amp_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast("cuda", dtype=amp_dtype, cache_enabled=False)

        self._snapshot_weights()
        static_input = x.detach().clone(memory_format=torch.contiguous_format)
        with torch.no_grad(), amp():
            # First call on the current stream: folds BatchNorm (the folded tensors then belong to
            # this stream's memory, which later replays on it use safely).
            self.model(static_input)
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as the CUDA graph docs ask
                for _ in range(self.warmup_steps):
                    self.model(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.model(static_input)
        folded = [m._folded_bn.stored for m in self.model.modules()
                  if getattr(m, "_folded_bn", None) is not None and m._folded_bn.stored is not None]
        return _CapturedForward(graph, static_input, static_output, folded)


def inference_model(model: nn.Module, example_input: Optional[Tensor] = None, *, cuda_graphs: Optional[bool] = None,
                    check_weights: bool = True, clone_output: bool = True, warmup_steps: int = 2) -> InferenceModel:
    """`model` in eval mode for inference: BatchNorm folded once; on a GPU, CUDA-graph replay per input shape.

    example_input: an image batch to fold (and on a GPU capture) now rather than on the first call.
    cuda_graphs: None (default) uses graphs for CUDA inputs; True requires the model on a GPU; False never.
    check_weights: re-capture when a parameter or buffer changed since capture (see the module doc).
    clone_output: return a copy of the graph's static output (False: the buffer, reused by the next call).
    Returns an `InferenceModel`; call it like the model. Its logits equal the eval model's.
    """
    fast = InferenceModel(model, cuda_graphs=cuda_graphs, check_weights=check_weights, clone_output=clone_output,
                          warmup_steps=warmup_steps)
    if example_input is not None:
        fast(example_input)
    return fast

"""Conversion between the official CvT state-dict keys and Hugging Face's `CvtForImageClassification`.

The two implementations hold the same tensors under different names (no tensor is
reshaped, split or transposed), so the conversion is a pure renaming, exact in both
directions. The table below lists each official key pattern beside its Hugging Face
counterpart; `{i}` is the stage, `{j}` the block, `{qkv}` one of q/k/v, whose Hugging
Face spelling is query/key/value.

Differences of the Hugging Face port that the renaming does not hide (see DESIGN.md):
its MLP uses exact GELU (build our model with act="gelu" to reproduce its logits), its
drop-path rate is indexed by the stage instead of the block, and only the "dw_bn"
projection method runs there.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# Official key pattern -> Hugging Face key pattern. Placeholders: {i} stage, {j} block,
# {qkv} q/k/v (query/key/value), {p} the parameter or buffer name (weight, bias,
# running_mean, ...). Block-level entries are relative to the block prefixes below.
_HF_STAGE = "cvt.encoder.stages.{i}"
_HF_BLOCK = _HF_STAGE + ".layers.{j}"
_KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("stage{i}.patch_embed.proj.{p}", _HF_STAGE + ".embedding.convolution_embeddings.projection.{p}"),
    ("stage{i}.patch_embed.norm.{p}", _HF_STAGE + ".embedding.convolution_embeddings.normalization.{p}"),
    ("stage{i}.cls_token", _HF_STAGE + ".cls_token"),
    ("stage{i}.blocks.{j}.norm1.{p}", _HF_BLOCK + ".layernorm_before.{p}"),
    ("stage{i}.blocks.{j}.norm2.{p}", _HF_BLOCK + ".layernorm_after.{p}"),
    ("stage{i}.blocks.{j}.attn.conv_proj_{qkv}.conv.{p}",
     _HF_BLOCK + ".attention.attention.convolution_projection_{qkv}.convolution_projection.convolution.{p}"),
    ("stage{i}.blocks.{j}.attn.conv_proj_{qkv}.bn.{p}",
     _HF_BLOCK + ".attention.attention.convolution_projection_{qkv}.convolution_projection.normalization.{p}"),
    ("stage{i}.blocks.{j}.attn.proj_{qkv}.{p}", _HF_BLOCK + ".attention.attention.projection_{qkv}.{p}"),
    ("stage{i}.blocks.{j}.attn.proj.{p}", _HF_BLOCK + ".attention.output.dense.{p}"),
    ("stage{i}.blocks.{j}.mlp.fc1.{p}", _HF_BLOCK + ".intermediate.dense.{p}"),
    ("stage{i}.blocks.{j}.mlp.fc2.{p}", _HF_BLOCK + ".output.dense.{p}"),
    ("norm.{p}", "layernorm.{p}"),
    ("head.{p}", "classifier.{p}"),
)

_OFFICIAL_QKV = ("q", "k", "v")
_HF_QKV = ("query", "key", "value")
_PLACEHOLDER = re.compile(r"\{(i|j|qkv|p)\}")


def _compile(template: str, qkv_words: tuple[str, ...]) -> re.Pattern[str]:
    """Turn a table template into an anchored regex with one named group per placeholder."""
    groups = {
        "i": r"(?P<i>\d+)",
        "j": r"(?P<j>\d+)",
        "qkv": "(?P<qkv>" + "|".join(qkv_words) + ")",
        # A parameter or buffer name has no dot; this keeps 'proj.{p}' from eating 'proj_q.x'.
        "p": r"(?P<p>[A-Za-z_][A-Za-z0-9_]*)",
    }
    pieces = []
    last = 0
    for match in _PLACEHOLDER.finditer(template):
        pieces.append(re.escape(template[last:match.start()]))
        pieces.append(groups[match.group(1)])
        last = match.end()
    pieces.append(re.escape(template[last:]))
    return re.compile("".join(pieces) + r"\Z")


_OFFICIAL_TO_HF = [(_compile(o, _OFFICIAL_QKV), h) for o, h in _KEY_TABLE]
_HF_TO_OFFICIAL = [(_compile(h, _HF_QKV), o) for o, h in _KEY_TABLE]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]], qkv_map: dict[str, str]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(key)
        if match is None:
            continue
        fields = match.groupdict()
        if "qkv" in fields:
            fields["qkv"] = qkv_map[fields["qkv"]]
        return target.format(**fields)
    return None


def _convert(state_dict: Mapping[str, Any], rules: list[tuple[re.Pattern[str], str]],
             qkv_map: dict[str, str], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state_dict.items():
        new_key = _rename(key, rules, qkv_map)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise ValueError(f"{len(unknown)} key(s) are not {source} CvT keys: {shown}{more}")
    return out


def official_to_hf(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an official (and cvt_fast) CvT state dict to `CvtForImageClassification` keys.

    The tensors are the same objects (no copies). Raises ValueError naming the keys
    that are not official CvT keys.
    """
    return _convert(state_dict, _OFFICIAL_TO_HF, dict(zip(_OFFICIAL_QKV, _HF_QKV)), "official")


def hf_to_official(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a Hugging Face CvT state dict to the official keys that cvt_fast models use.

    Accepts `CvtForImageClassification` keys ('cvt.encoder.stages...') and the keys of a
    bare `CvtModel` ('encoder.stages...', no classifier). Raises ValueError naming the
    keys that are not Hugging Face CvT keys.
    """
    # A bare CvtModel has no 'cvt.' prefix; give it one so one table serves both.
    prefixed = {("cvt." + k if k.startswith("encoder.") else k): v for k, v in state_dict.items()}
    return _convert(prefixed, _HF_TO_OFFICIAL, dict(zip(_HF_QKV, _OFFICIAL_QKV)), "Hugging Face")


def is_hf_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True when the keys look like Hugging Face CvT keys rather than official ones."""
    return any(k.startswith(("cvt.encoder.stages.", "encoder.stages.")) for k in state_dict)


def _per_stage(spec: Mapping[str, Any], key: str, num_stages: int) -> list[Any]:
    if key not in spec:
        raise ValueError(f"MODEL.SPEC has no {key!r}; expected a list of {num_stages} values")
    value = spec[key]
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(f"MODEL.SPEC.{key} = {list(value)} has {len(value)} entries; "
                             f"expected NUM_STAGES = {num_stages}")
        return list(value)
    return [value] * num_stages


def hf_config_from_spec(spec: Mapping[str, Any], num_classes: int = 1000, act: str = "gelu") -> Any:
    """A `transformers.CvtConfig` describing the same network as the official MODEL.SPEC `spec`.

    Hugging Face's CvT hard-codes exact GELU in its MLP, so `act` must be "gelu"; a
    cvt_fast model built with act="gelu" and weights converted by `official_to_hf`
    then computes the same function. Only the "dw_bn" projection method runs in the
    Hugging Face port. Note its drop-path quirk: the rate of stage i is
    linspace(0, DROP_PATH_RATE[i], DEPTH[i])[i] for every block of that stage (and its
    constructor fails when DEPTH[i] <= i).
    """
    from transformers import CvtConfig  # optional dependency, imported only when used

    if act != "gelu":
        raise ValueError(f"act={act!r}: Hugging Face's CvT uses exact GELU in its MLP; expected act='gelu'")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r}; expected a non-negative int")
    n = int(spec.get("NUM_STAGES", len(spec["DEPTH"])))
    methods = _per_stage(spec, "QKV_PROJ_METHOD", n)
    bad = [m for m in methods if m != "dw_bn"]
    if bad:
        raise ValueError(f"QKV_PROJ_METHOD {methods}: Hugging Face's CvT only runs 'dw_bn' "
                         f"(its {bad[0]!r} projection has no forward); expected 'dw_bn' in every stage")
    return CvtConfig(
        num_channels=3,
        patch_sizes=_per_stage(spec, "PATCH_SIZE", n),
        patch_stride=_per_stage(spec, "PATCH_STRIDE", n),
        patch_padding=_per_stage(spec, "PATCH_PADDING", n),
        embed_dim=_per_stage(spec, "DIM_EMBED", n),
        num_heads=_per_stage(spec, "NUM_HEADS", n),
        depth=_per_stage(spec, "DEPTH", n),
        mlp_ratio=[float(r) for r in _per_stage(spec, "MLP_RATIO", n)],
        attention_drop_rate=[float(r) for r in _per_stage(spec, "ATTN_DROP_RATE", n)],
        drop_rate=[float(r) for r in _per_stage(spec, "DROP_RATE", n)],
        drop_path_rate=[float(r) for r in _per_stage(spec, "DROP_PATH_RATE", n)],
        qkv_bias=[bool(b) for b in _per_stage(spec, "QKV_BIAS", n)],
        cls_token=[bool(b) for b in _per_stage(spec, "CLS_TOKEN", n)],
        qkv_projection_method=methods,
        kernel_qkv=_per_stage(spec, "KERNEL_QKV", n),
        padding_q=_per_stage(spec, "PADDING_Q", n),
        padding_kv=_per_stage(spec, "PADDING_KV", n),
        stride_q=_per_stage(spec, "STRIDE_Q", n),
        stride_kv=_per_stage(spec, "STRIDE_KV", n),
        layer_norm_eps=1e-5,
        num_labels=num_classes,
    )


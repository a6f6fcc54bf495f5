"""4-bit GPTQ and AWQ checkpoints: config parsing, conversion to one layout, and the
weight object the model applies.

A Hugging Face directory whose config.json has a ``quantization_config`` stores each
quantized linear (``...q_proj``) as a few tensors instead of ``...q_proj.weight``:

    GPTQ  qweight [K/8, N] int32, packed along K: word (i, n), nibble j = row 8i + j
          qzeros  [G, N/8] int32, packed along N: word (g, c), nibble j = column 8c + j;
                  checkpoint_format gptq (v1) stores zero - 1, gptq_v2 the zero itself
          scales  [G, N] float16;  g_idx [K] int32, the group of each input row
          (unsorted with desc_act, "act-order": groups are scattered over K)
    AWQ   qweight [K, N/8] int32, packed along N in AWQ's interleaved order: word (r, c),
          nibble j = column 8c + (0, 2, 4, 6, 1, 3, 5, 7)[j]
          qzeros  [G, N/8] int32, same packing, the zero itself;  scales [G, N] float16;
          groups are consecutive rows (no g_idx)

    both  W[r, n] = (code[r, n] - zero[group(r), n]) * scale[group(r), n],  y = x @ W

Both convert once, at load, to ``kernels.w4a16``'s layout (``QuantizedWeight``): codes
packed along K in group order, zeros unpacked to uint8 (or dropped when all are 8), and,
for act-order, the rows sorted by group with ``perm`` telling the kernel which activation
column each row multiplies, so no step ever looks a group up per row. On the CPU the
weights are dequantized once to float instead (``dequantize``): the model then runs its
oneDNN float32 path, which beats unpacking 4-bit codes on every step there.

Embeddings, norms and the LM head stay float, as the checkpoint stores them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tessera.common.executor_config import QUANTIZATIONS
from tessera.common.model_config import ModelConfig
from tessera.common.registry import RANDOM_PREFIX, ModelSource, random_config
from tessera.executor.weights.layout import LoadedModel, expected_shapes
from tessera.executor.weights.random import _random_tensor
from tessera.kernels.w4a16_reference import dequantize_ref

PACK = 8  # 4-bit codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble j of an AWQ word holds column 8c + AWQ_ORDER[j]
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_GPTQ_FORMATS = ("gptq", "gptq_v2")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(slots=True, frozen=True)
class QuantConfig:
    """A checkpoint's ``quantization_config``, checked: 4-bit GPTQ or AWQ GEMM."""

    method: str  # gptq | awq
    group_size: int  # input rows per group; -1: one group of all rows
    desc_act: bool = False  # GPTQ act-order: g_idx scatters groups over the rows
    zero_offset: int = 0  # added to stored zeros: 1 for GPTQ v1 (stores zero - 1)


def quant_config(config: dict[str, Any], requested: str, where: str) -> QuantConfig | None:
    """The checked quantization of a config.json dict, or None for a float checkpoint.

    ``requested``: auto (whatever the config says), none (a float checkpoint is expected),
    gptq or awq (the config must say the same). Raises ValueError naming the field.
    """
    if requested not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {requested!r}"
        )
    qc = config.get("quantization_config")
    if qc is None:
        if requested in ("gptq", "awq"):
            raise ValueError(
                f"quantization={requested!r}, but {where} has no quantization_config: it is a "
                "float checkpoint (use quantization='auto' or 'none')"
            )
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = str(qc.get("quant_method", "")).lower()
    if requested == "none":
        raise ValueError(
            f"{where} is quantized (quant_method {method!r}) but quantization='none'; "
            "use quantization='auto' to load it"
        )
    if method not in ("gptq", "awq"):
        raise ValueError(
            f"{where}: quantization_config.quant_method {method!r} is not supported; "
            "Tessera loads 4-bit gptq and awq checkpoints"
        )
    if requested != "auto" and requested != method:
        raise ValueError(
            f"quantization={requested!r}, but {where} is quantized with {method!r}"
        )
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{where}: quantization_config.bits {bits!r} is not supported; only 4")
    group_size = qc.get("group_size", qc.get("q_group_size"))
    if not isinstance(group_size, int) or not (group_size == -1 or group_size >= 16):
        raise ValueError(
            f"{where}: quantization_config.group_size {group_size!r} is not supported; "
            "use -1 or a multiple of 16 such as 32, 64 or 128"
        )
    if group_size != -1 and group_size % 16:
        raise ValueError(
            f"{where}: quantization_config.group_size {group_size} is not a multiple of 16"
        )
    pack_dtype = qc.get("pack_dtype", "int32")
    if pack_dtype != "int32":
        raise ValueError(f"{where}: quantization_config.pack_dtype {pack_dtype!r}; only int32")
    if qc.get("lm_head"):
        raise ValueError(f"{where}: a quantized lm_head (quantization_config.lm_head) is not "
                         "supported; the LM head must be float")
    if qc.get("dynamic"):
        raise ValueError(f"{where}: per-module overrides (quantization_config.dynamic) are "
                         "not supported")
    if method == "gptq":
        return _gptq_config(qc, group_size, where)
    return _awq_config(qc, group_size, where)


def _gptq_config(qc: dict[str, Any], group_size: int, where: str) -> QuantConfig:
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if fmt not in _GPTQ_FORMATS:
        raise ValueError(
            f"{where}: quantization_config.checkpoint_format {fmt!r} is not supported "
            f"(a kernel-specific repacking such as Marlin's or exllama's); Tessera reads "
            f"{' and '.join(_GPTQ_FORMATS)}. Save the model again in the gptq format."
        )
    return QuantConfig(
        method="gptq",
        group_size=group_size,
        desc_act=bool(qc.get("desc_act", False)),
        zero_offset=1 if fmt == "gptq" else 0,
    )


def _awq_config(qc: dict[str, Any], group_size: int, where: str) -> QuantConfig:
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm":
        raise ValueError(
            f"{where}: AWQ version {version!r} is not supported (GEMV, Marlin and exllama "
            "files pack differently); Tessera reads AWQ GEMM checkpoints"
        )
    return QuantConfig(method="awq", group_size=group_size)


@dataclass(slots=True, eq=False)
class QuantizedWeight:
    """A 4-bit linear weight in ``kernels.w4a16``'s layout; stands where a float
    ``[out, in]`` weight would (``shape``), and multiplies through ``linear``."""

    qweight: torch.Tensor  # [K/8, N] int32, rows in group order
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor | None  # [G, N] uint8; None: 8 everywhere
    perm: torch.Tensor | None  # [K] int32: row i multiplies x[:, perm[i]]; None: identity
    group_size: int  # -1: one group

    @property
    def shape(self) -> tuple[int, int]:  # [out, in], as a float weight's
        return (self.qweight.shape[1], self.qweight.shape[0] * PACK)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from tessera.kernels.w4a16 import w4a16_matmul

        return w4a16_matmul(
            x, self.qweight, self.scales, self.zeros, self.perm, self.group_size, bias
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``[out, in]`` weight (exact in float32)."""
        w = dequantize_ref(self.qweight, self.scales, self.zeros, self.perm, self.group_size)
        return w.t().contiguous().to(dtype)


@dataclass(slots=True, eq=False)
class ConcatWeight:
    """Weights fused along the output dimension that cannot share one GEMM (act-order
    parts with different permutations): one GEMM each, outputs side by side."""

    parts: list[QuantizedWeight]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([p.linear(x) for p in self.parts], dim=-1)
        return y + bias if bias is not None else y


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a linear weight: a float ``[out, in]`` tensor, or a 4-bit weight object."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return w.linear(x, bias)


def cat_out_features(weights: list):
    """Fuse linears of one input along their outputs (q/k/v, gate/up), float or 4-bit."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights)
    if not all(isinstance(w, QuantizedWeight) for w in weights):
        raise ValueError("cannot fuse float and 4-bit weights into one linear")
    first = weights[0]
    same_perm = all(
        (w.perm is None and first.perm is None)
        or (w.perm is not None and first.perm is not None and torch.equal(w.perm, first.perm))
        for w in weights
    )
    if not same_perm or any(w.group_size != first.group_size for w in weights):
        return ConcatWeight(list(weights))
    has_zeros = any(w.zeros is not None for w in weights)
    return QuantizedWeight(
        qweight=torch.cat([w.qweight for w in weights], dim=1),
        scales=torch.cat([w.scales for w in weights], dim=1),
        zeros=torch.cat([_zeros_of(w) for w in weights], dim=1) if has_zeros else None,
        perm=first.perm,
        group_size=first.group_size,
    )


def _zeros_of(w: QuantizedWeight) -> torch.Tensor:
    if w.zeros is not None:
        return w.zeros
    return torch.full(w.scales.shape, 8, dtype=torch.uint8, device=w.scales.device)


def is_quantized_part(name: str) -> bool:
    """Whether checkpoint tensor ``name`` is part of a quantized linear (kept as stored)."""
    return name.rsplit(".", 1)[-1] in _PARTS


def convert_checkpoint(
    tensors: dict[str, torch.Tensor],
    config: ModelConfig,
    quant: QuantConfig,
    dtype: torch.dtype,
    dequantize: bool,
) -> dict[str, Any]:
    """Replace each quantized linear's parts in ``tensors`` by ``<linear>.weight``: a
    ``QuantizedWeight``, or with ``dequantize`` its float weight in ``dtype``."""
    out: dict[str, Any] = {}
    linears = sorted({name.rsplit(".", 1)[0] for name in tensors if is_quantized_part(name)})
    for prefix in linears:
        parts = {p: tensors.pop(f"{prefix}.{p}", None) for p in _PARTS}
        to_float = dtype if dequantize else None
        out[f"{prefix}.weight"] = _convert_linear(prefix, parts, quant, to_float)
    for name, tensor in tensors.items():
        if name.endswith(".bias") and _stray_bias(name, config):
            # Old AutoGPTQ files store a zero bias for every linear; the model has none.
            if torch.count_nonzero(tensor):
                raise ValueError(f"checkpoint has a non-zero {name}, which the model lacks")
            continue
        out[name] = tensor
    return out


def _stray_bias(name: str, config: ModelConfig) -> bool:
    module = name.rsplit(".", 2)[-2]
    qkv = module in ("q_proj", "k_proj", "v_proj")
    return module in _LINEARS and not (qkv and config.attention_bias)


def _convert_linear(
    prefix: str, parts: dict, quant: QuantConfig, dequantize_to: torch.dtype | None
) -> QuantizedWeight | torch.Tensor:
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    for name, t in (("qweight", qweight), ("scales", scales)):
        if t is None:
            raise ValueError(f"checkpoint lacks {prefix}.{name}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"{prefix}.qweight must be a 2-D int32 tensor, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    if quant.method == "gptq":
        codes = _unpack_rows(qweight)  # [K, N]
    else:
        codes = _unpack_cols(qweight, AWQ_ORDER)  # [K, N]
    k, n = codes.shape
    group = k if quant.group_size == -1 else quant.group_size
    num_groups = -(-k // group)
    if k % group:
        raise ValueError(f"{prefix}: group_size {quant.group_size} does not divide K = {k}")
    if tuple(scales.shape) != (num_groups, n):
        raise ValueError(f"{prefix}.scales has shape {tuple(scales.shape)}, expected "
                         f"{(num_groups, n)} for K = {k}, N = {n}, group_size {quant.group_size}")
    zeros = None
    if qzeros is not None:
        if tuple(qzeros.shape) != (num_groups, n // PACK) or qzeros.dtype != torch.int32:
            raise ValueError(f"{prefix}.qzeros has shape {tuple(qzeros.shape)} "
                             f"{qzeros.dtype}, expected {(num_groups, n // PACK)} int32")
        order = tuple(range(PACK)) if quant.method == "gptq" else AWQ_ORDER
        zeros = (_unpack_cols(qzeros, order) + quant.zero_offset).to(torch.uint8)
        if bool((zeros == 8).all()):
            zeros = None  # symmetric: the kernel's implied zero point
    perm = _act_order(prefix, parts["g_idx"], k, group, quant)
    if dequantize_to is not None:
        groups = torch.arange(k, device=codes.device) // group
        if perm is not None:
            groups = parts["g_idx"].long()
        return _dequantize_rows(codes, scales, zeros, groups, dequantize_to)
    if perm is not None:
        codes = codes[perm.long()]
    return QuantizedWeight(
        qweight=_pack_rows(codes),
        scales=scales.contiguous(),
        zeros=zeros,
        perm=perm,
        group_size=quant.group_size,
    )


def _dequantize_rows(
    codes: torch.Tensor,  # [K, N] uint8, rows in input order
    scales: torch.Tensor,  # [G, N]
    zeros: torch.Tensor | None,  # [G, N] uint8
    groups: torch.Tensor,  # [K]: the group of each row
    dtype: torch.dtype,
) -> torch.Tensor:  # [N, K] in dtype: (code - zero) * scale, exact in float32
    w = codes.t().contiguous().float()
    if zeros is None:
        w.sub_(8.0)
    else:
        w.sub_(zeros.t()[:, groups].float())
    w.mul_(scales.t().float()[:, groups])
    return w.to(dtype)


def _act_order(
    prefix: str, g_idx: torch.Tensor | None, k: int, group: int, quant: QuantConfig
) -> torch.Tensor | None:
    """The row order that makes groups consecutive (int32 [K]), or None if they are."""
    if g_idx is None:
        if quant.desc_act:
            raise ValueError(f"desc_act is set but the checkpoint lacks {prefix}.g_idx")
        return None
    if tuple(g_idx.shape) != (k,):
        raise ValueError(f"{prefix}.g_idx has shape {tuple(g_idx.shape)}, expected ({k},)")
    g_idx = g_idx.long()
    consecutive = torch.arange(k, device=g_idx.device) // group
    if torch.equal(g_idx, consecutive):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], consecutive):
        raise ValueError(
            f"{prefix}.g_idx does not give every group {group} rows; cannot load it"
        )
    return perm.to(torch.int32)


def _unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 packed along rows -> [8R, C] uint8 (nibble j of word i = row 8i + j)."""
    shifts = torch.arange(0, 32, 4, device=words.device, dtype=torch.int32)
    codes = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [R, 8, C]
    return codes.to(torch.uint8).reshape(-1, words.shape[1])


def _unpack_cols(words: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """[R, C] int32 packed along columns -> [R, 8C] uint8: nibble j of word (r, c) is
    column 8c + order[j]."""
    shifts = torch.tensor([4 * order.index(i) for i in range(PACK)], device=words.device,
                          dtype=torch.int32)  # the nibble holding column 8c + i
    codes = (words[:, :, None] >> shifts) & 0xF  # [R, C, 8]
    return codes.to(torch.uint8).reshape(words.shape[0], -1)


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[K, N] codes 0..15 -> [K/8, N] int32 packed along K (the inverse of _unpack_rows)."""
    k, n = codes.shape
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (codes.reshape(k // PACK, PACK, n).long() << shifts[None, :, None]).sum(dim=1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the int32 bit pattern
    return words.to(torch.int32).contiguous()


def load_random_quantized(
    source: ModelSource,
    quantization: str,
    dtype: torch.dtype,
    device: str | torch.device,
    progress: bool,
    seed: int = 0,
    shard: object | None = None,
) -> LoadedModel:
    """Random weights of ``source``'s shape (as ``load_random``) with every linear as
    random 4-bit codes: symmetric, group 128 (or the largest of 64, 32, 16 that divides
    K), scales that give the weights about the float ones' std of 0.02. For benchmarks;
    dequantized to ``dtype`` on the CPU, as checkpoints are."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}"
        )
    if source.kind != "random":
        raise ValueError(
            f"quantization={quantization!r} needs a Hugging Face checkpoint with a "
            f"quantization_config; {source.name!r} is a {source.kind} model"
        )
    if shard is not None:
        raise ValueError("tensor parallel over 4-bit (GPTQ / AWQ) weights is not supported yet")
    shape = source.name.removeprefix(RANDOM_PREFIX)
    config = random_config(shape)
    device = torch.device(device)
    tensors: dict[str, Any] = {}
    for name, size in tqdm(
        expected_shapes(config).items(), desc=f"Random {shape} (4-bit)", unit="tensor",
        disable=not progress,
    ):
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in _LINEARS:
            tensors[name] = _random_tensor(name, size, dtype, device, seed)
            continue
        n, k = size
        group = next(g for g in (128, 64, 32, 16) if k % g == 0)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        qweight = torch.randint(
            -(2**31), 2**31 - 1, (k // PACK, n), generator=gen, device=device, dtype=torch.int32
        )
        # Codes uniform in 0..15 around 8 have std ~4.6: a step of 0.02 / 4.6.
        scales = torch.full((k // group, n), 0.02 / 4.6, dtype=torch.float16, device=device)
        weight = QuantizedWeight(qweight, scales, None, None, group)
        tensors[name] = weight.dequantize(dtype) if device.type == "cpu" else weight
    return LoadedModel(config=config, tensors=tensors)

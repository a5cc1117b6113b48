"""The `int2_triton` attention backend for sglang==0.5.17 (imports sglang lazily).

`Int2TritonAttnBackend(AttentionBackend)` reads and writes only the int2 pool:

  extend  q, k -> q R_K, k R_K (post-RoPE, fp32 accumulation, bf16); v -> v R_V unless the
          layer's V rotation was absorbed at load; the chunk's rows are written (INT2 body /
          BF16 windows as `attention.plan_extend` routed them) and the queries attend to the
          flushed prefix + the chunk in BF16 (`attention.extend_attention`).
  decode  the new row goes to its BF16 window slot (`storage.write_decode`: static shapes,
          padded rows to the dummy row), then `kernels.decode_attention` with the query
          rotation fused (q_rotation = R_K) over slot tables built from req_to_token.
  output  o R_V^T unless absorbed (then o_proj holds R_V^T).

Metadata follows SGLang's plan-then-run contract: `init_forward_metadata` (eager) and
`init_forward_metadata_out_graph` (CUDA-graph capture/replay, outside the graph) build the
slot tables and the split-K `DecodePlan` once per step for all layers. For graphs the tables
live in static buffers of width req_to_token.shape[1] (the context length) and one plan per
captured batch size; replay refills the buffers, the captured kernels read them. No host
sync on the decode path. The parent class is SGLang's `AttentionBackend` (not its Triton
backend): nothing of the stock Triton metadata is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oscar_kv.errors import OscarError
from oscar_kv.kernels import DecodePlan, KVTables, hp_table_len, plan_decode
from oscar_kv.sglang_plugin.attention import (
    DecodeMeta,
    ExtendPlan,
    decode_layer,
    extend_layer,
    plan_extend,
)
from oscar_kv.sglang_plugin.pool import ABSORBED_ATTR
from oscar_kv.sglang_plugin.server_args import BACKEND_NAME

EAGER_WIDTH_ALIGN = 256  # eager decode tables cover max(seq_len) rounded up to this


@dataclass(frozen=True)
class GraphBuffers:
    """Static decode tables for CUDA graphs: [max_bs, width - P], [max_bs], [max_bs, hp]."""

    int2_slots: torch.Tensor
    body_len: torch.Tensor
    bf16_slots: torch.Tensor
    hp_len: torch.Tensor
    width: int

    def view(self, bs: int) -> KVTables:
        return KVTables(self.int2_slots[:bs], self.body_len[:bs], self.bf16_slots[:bs],
                        self.hp_len[:bs])

    def fill(self, tables: KVTables) -> None:
        b, nb, nh = tables.batch_size, tables.int2_slots.shape[1], tables.bf16_slots.shape[1]
        self.int2_slots[:b, :nb].copy_(tables.int2_slots)
        self.bf16_slots[:b, :nh].copy_(tables.bf16_slots)
        self.body_len[:b].copy_(tables.body_len)
        self.hp_len[:b].copy_(tables.hp_len)


def _add_backend_choice() -> None:
    try:  # sglang >= 0.5.21 moved the adder
        from sglang.srt.arg_groups.choices import add_attention_backend_choices
    except ImportError:
        from sglang.srt.server_args import add_attention_backend_choices
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])


def local_q_heads(model_config) -> int:
    """Query heads on this attention-TP rank."""
    from sglang.srt.runtime_context import get_parallel

    return model_config.get_num_attention_heads(get_parallel().attn_tp_size)


def create_int2_backend(runner):
    """Factory for SGLang's attention registry: runner is the ModelRunner."""
    if getattr(runner.model_config, "is_encoder_decoder", False):
        raise OscarError(f"--attention-backend {BACKEND_NAME} does not support "
                         "encoder-decoder models; use another backend without int2")
    pool = runner.token_to_kv_pool
    if not getattr(pool, "oscar_kv_int2", False):
        raise OscarError(f"--attention-backend {BACKEND_NAME} reads the int2 KV pool only; "
                         "add --kv-cache-dtype int2")
    return int2_backend_class()(pool, runner.req_to_token_pool.req_to_token,
                                local_q_heads(runner.model_config), runner.dtype)


def register_backend() -> None:
    """H2: `--attention-backend int2_triton` -> Int2TritonAttnBackend."""
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    _add_backend_choice()
    if BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(BACKEND_NAME)(create_int2_backend)


def check_layer(layer, num_q_heads: int, kwargs: dict) -> None:
    """Reject attention features the int2 kernels do not implement (one sentence each)."""
    why = "--kv-cache-dtype int2 does not support"
    bad = [k for k in ("sinks", "score_mod", "aux_tensors") if kwargs.get(k) is not None]
    if bad:
        raise OscarError(f"{why} attention {'/'.join(bad)} (layer {layer.layer_id}); serve "
                         "this model without int2")
    if getattr(layer, "logit_cap", 0) and layer.logit_cap > 0:
        raise OscarError(f"{why} logit soft-capping (layer {layer.layer_id}); serve this "
                         "model without int2")
    if getattr(layer, "sliding_window_size", -1) not in (None, -1) or \
            getattr(layer, "is_cross_attention", False):
        raise OscarError(f"{why} sliding-window or cross attention (layer {layer.layer_id})")
    if layer.qk_head_dim != layer.v_head_dim or layer.tp_q_head_num != num_q_heads:
        raise OscarError(f"layer {layer.layer_id} has {layer.tp_q_head_num} query heads of "
                         f"dims {layer.qk_head_dim}/{layer.v_head_dim} but the int2 backend "
                         f"planned {num_q_heads} heads of equal K/V dims; this model is not "
                         "supported with int2")


_CLASSES: dict[str, type] = {}


def int2_backend_class() -> type:
    """Int2TritonAttnBackend(AttentionBackend), built on first use (imports sglang)."""
    if "backend" in _CLASSES:
        return _CLASSES["backend"]
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    class Int2TritonAttnBackend(AttentionBackend):
        """Mixed INT2/BF16 attention over the int2 pool (see the module docstring).

        forward_decode / forward_extend(q [T, Hq*D], k, v [T, Hkv, D], layer, forward_batch)
        -> [T, Hq*D] in the model dtype."""

        oscar_kv_int2 = True
        needs_cpu_seq_lens = True

        def __init__(self, pool, req_to_token: torch.Tensor, num_q_heads: int,
                     dtype: torch.dtype, kernel_backend: str = "auto",
                     extend_impl: str | None = None) -> None:
            super().__init__()
            self.pool, self.storage, self.numerics = pool, pool.storage, pool.numerics
            self.req_to_token = req_to_token
            self.num_q_heads = num_q_heads
            self.dtype = dtype
            self.device = self.storage.device
            self.kernel_backend = kernel_backend
            self.hp_max_splits = pool.setup.cfg.hp_max_splits
            self.extend_impl = extend_impl or ("sglang" if self.device.type == "cuda"
                                               else "torch")
            self.forward_metadata: DecodeMeta | ExtendPlan | None = None
            self.graph: GraphBuffers | None = None
            self.graph_plans: dict[int, DecodePlan] = {}
            self.eager_plans: dict[int, DecodePlan] = {}
            self._checked: set[int] = set()
            self._targets: tuple | None = None  # (out_cache_loc, DecodeTargets) of this step

        # ---- metadata ----------------------------------------------------------------
        def _plan(self, bs: int) -> DecodePlan:
            """Split-K plan for tables up to the context length (the tables of one step may be
            narrower: splits follow each sequence's own length); BF16 splits capped by
            SGLANG_MIXED_KV_HP_MAX_SPLITS. One per batch size, so the cache stays bounded."""
            s, width = self.storage, self.req_to_token.shape[1]
            kw = dict(max_body_len=max(width - s.window.sink_tokens, 0),
                      max_hp_len=hp_table_len(s.window, width), device=self.device,
                      out_dtype=self.dtype, int2_group_size=s.spec.group_size)
            plan = plan_decode(bs, self.num_q_heads, s.num_kv_heads, s.head_dim, **kw)
            if plan.hp_splits > self.hp_max_splits:
                plan = plan_decode(bs, self.num_q_heads, s.num_kv_heads, s.head_dim,
                                   hp_splits=self.hp_max_splits, **kw)
            return plan

        def _width(self, fb) -> int:
            """Columns of req_to_token the step's tables read: max(seq_len), aligned."""
            full = self.req_to_token.shape[1]
            lens = getattr(fb, "seq_lens_cpu", None)
            if lens is None or len(lens) == 0:
                return full
            a = EAGER_WIDTH_ALIGN
            return min(full, -(-int(torch.as_tensor(lens).max()) // a) * a)

        def _tables(self, fb, width: int) -> KVTables:
            return self.storage.decode_tables(self.req_to_token, fb.req_pool_indices,
                                              fb.seq_lens, width)

        def init_forward_metadata(self, forward_batch) -> None:
            fb, mode = forward_batch, forward_batch.forward_mode
            if mode.is_idle():
                self.forward_metadata = None
            elif mode.is_decode():
                bs = fb.batch_size
                if bs not in self.eager_plans:
                    self.eager_plans[bs] = self._plan(bs)
                self.forward_metadata = DecodeMeta(self._tables(fb, self._width(fb)),
                                                   self.eager_plans[bs])
            elif mode in (mode.EXTEND, mode.MIXED):
                prefix, ext = fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu
                if prefix is None or ext is None:  # gpu-only batch: one host sync (extend only)
                    prefix, ext = fb.extend_prefix_lens.tolist(), fb.extend_seq_lens.tolist()
                self.forward_metadata = plan_extend(self.storage, self.req_to_token,
                                                    fb.req_pool_indices, prefix, ext,
                                                    fb.out_cache_loc)
            else:
                raise OscarError(f"forward mode {mode.name} is not supported with "
                                 "--kv-cache-dtype int2")

        def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
            w = self.req_to_token.shape[1]
            win = self.storage.window
            z = lambda *shape: torch.zeros(*shape, dtype=torch.int32, device=self.device)
            self.graph = GraphBuffers(z(max_bs, max(w - win.sink_tokens, 0)), z(max_bs),
                                      z(max_bs, hp_table_len(win, w)), z(max_bs), w)
            self.graph_plans = {}

        def get_cuda_graph_seq_len_fill_value(self) -> int:
            return 1

        def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
            fb = forward_batch
            if not fb.forward_mode.is_decode_or_idle() or fb.spec_info is not None:
                raise OscarError("the int2 backend captures CUDA graphs for plain decode only; "
                                 "disable prefill CUDA graphs and speculative decoding")
            if self.graph is None:
                raise OscarError("init_cuda_graph_state must run before CUDA-graph metadata")
            bs = fb.batch_size
            if in_capture:
                self.graph_plans[bs] = self._plan(bs)
            if bs not in self.graph_plans:
                raise OscarError(f"no CUDA graph was captured for batch size {bs}")
            self.graph.fill(self._tables(fb, min(self._width(fb), self.graph.width)))
            self.forward_metadata = DecodeMeta(self.graph.view(bs), self.graph_plans[bs])

        def init_forward_metadata_in_graph(self, forward_batch) -> None:
            return None

        # ---- forward -----------------------------------------------------------------
        def _layer(self, layer, kwargs: dict) -> int:
            if layer.layer_id not in self._checked:
                check_layer(layer, self.num_q_heads, kwargs)
                self._checked.add(layer.layer_id)
            return self.numerics.local(layer.layer_id)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            i = self._layer(layer, kwargs)
            plan = self.forward_metadata
            if not isinstance(plan, ExtendPlan):
                raise OscarError("int2 extend ran without extend metadata")
            if k is None or v is None or not save_kv_cache:
                raise OscarError("the int2 backend needs each layer's own K/V (no cross-layer "
                                 "KV sharing); this model is not supported with int2")
            hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
            o = extend_layer(self.storage, self.numerics, i, q.reshape(-1, hq, d),
                             k.reshape(-1, hkv, d), v.reshape(-1, hkv, d), plan, layer.scaling,
                             getattr(layer, ABSORBED_ATTR, False), self.extend_impl)
            return o.reshape(-1, hq * d)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            i = self._layer(layer, kwargs)
            meta = self.forward_metadata
            if not isinstance(meta, DecodeMeta):
                raise OscarError("int2 decode ran without decode metadata")
            hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
            write = save_kv_cache and k is not None
            loc = forward_batch.out_cache_loc
            if i == 0 or self._targets is None or self._targets[0] is not loc:
                # once per step (inside a captured graph: kernels of layer 0 the others read)
                self._targets = (loc, self.storage.decode_targets(loc))
            o = decode_layer(self.storage, self.numerics, i, q.reshape(-1, hq, d),
                             k.reshape(-1, hkv, d) if write else None,
                             v.reshape(-1, hkv, d) if write else None,
                             self._targets[1], meta, layer.scaling,
                             getattr(layer, ABSORBED_ATTR, False), self.kernel_backend)
            return o.reshape(-1, hq * d)

    _CLASSES["backend"] = Int2TritonAttnBackend
    return Int2TritonAttnBackend

"""Gated DeltaNet (linear attention) over a draft tree, and the state an accepted path leaves.
Knows nothing of transformers or models: tensors in, tensors out (`compat.py` feeds it a layer's own
projections and its cache's states).

A Gated DeltaNet layer (Qwen3-Next, Qwen3.5/3.6) carries two states per sequence instead of K/V:
  * a causal depthwise conv over its last K pre-conv inputs (the cache keeps the last S >= K - 1 of
    them, `conv_state` (B, C, S)), and
  * a recurrent matrix state S (B, H, Dk, Dv), updated per token t as
        S_t = e^{g_t} S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - e^{g_t} S_{t-1}^T k_t),   o_t = S_t^T q_t
    (transformers' `torch_recurrent_gated_delta_rule`; q, k l2-normalised, q scaled by Dk^-1/2).

On a tree, node i's input sequence is the cache followed by its own path (root, ..., i): its conv
window is the K inputs ending at i along that path (the cache's conv state where the path is
shorter), and its state comes from its parent's. Unrolling the recurrence along the path, with
G_i = sum of g over the path's nodes up to i and A(i) the path's nodes (i's ancestors and i),

    S_i = e^{G_i} S_0 + sum_{j in A(i)} e^{G_i - G_j} k_j u_j^T
    u_i = beta_i (v_i - e^{G_i} S_0^T k_i - sum_{j in A(i), j != i} e^{G_i - G_j} (k_i . k_j) u_j)
    o_i = e^{G_i} S_0^T q_i + sum_{j in A(i)} e^{G_i - G_j} (q_i . k_j) u_j

so all u come from ONE unit lower-triangular solve (I + M) U = R over the tree's nodes (parents come
before children, so M - nonzero only where j is a strict ancestor of i - is strictly lower
triangular): the chunked form of the delta rule (`torch_chunk_gated_delta_rule`) with the causal mask
replaced by the ancestor mask. No per-node state is ever formed: a verify keeps, per layer, the
nodes' k, u and G (`TreeRecurrence`: N (Dk + Dv + 1) floats per head, against N Dk Dv for N states),
and after the accept walk `path_state` forms the one state the cache keeps, that of the last
accepted node, and `path_conv_state` its conv window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """transformers' (and flash-linear-attention's) l2norm: x * rsqrt(sum(x^2) + eps)."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def tree_conv_windows(x: torch.Tensor, conv_state: torch.Tensor, ancestors: torch.Tensor, depths: torch.Tensor,
                      kernel: int) -> torch.Tensor:
    """Each node's causal conv window along its path.

    x: (B, C, N) the nodes' pre-conv inputs; conv_state: (B, C, S) the last S >= kernel - 1 inputs before
    the root (the cache's); ancestors: (B, N, D + 1) long, node index at each depth of each node's path
    (`tree.ancestors_by_depth`); depths: (B, N) long. Returns (B, C, N, kernel): window[..., i, t] is the
    input at depth depths[i] - (kernel - 1) + t of node i's path (from conv_state where that depth < 0).
    """
    B, C, N = x.shape
    S = conv_state.shape[-1]
    if S < kernel - 1:
        raise ValueError(f"a conv state of {S} inputs cannot feed a kernel of {kernel} (needs {kernel - 1}).")
    src = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (B, C, S + N)
    at = depths[:, :, None] + torch.arange(1 - kernel, 1, device=x.device)  # (B, N, kernel): depth of each entry
    node = ancestors.gather(2, at.clamp(min=0))  # (B, N, kernel)
    idx = torch.where(at >= 0, S + node, S + at)  # a depth < 0 is conv_state's column S + depth
    return src.gather(2, idx.reshape(B, 1, N * kernel).expand(B, C, N * kernel)).view(B, C, N, kernel)


def tree_causal_conv(x: torch.Tensor, conv_state: torch.Tensor, ancestors: torch.Tensor, depths: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor | None, activation) -> torch.Tensor:
    """The depthwise causal conv of every node over its own path: (B, C, N) -> (B, C, N).
    weight: (C, kernel) (the conv1d's weight squeezed); activation: a callable (or None)."""
    win = tree_conv_windows(x, conv_state, ancestors, depths, weight.shape[-1]).to(weight.dtype)  # (B, C, N, K)
    out = (win * weight[None, :, None, :]).sum(-1)
    if bias is not None:
        out = out + bias[None, :, None]
    if activation is not None:
        out = activation(out)
    return out.to(x.dtype)


@dataclass
class TreeRecurrence:
    """What one layer's tree verification keeps for the state update after the walk (float32).

    k (B, H, N, Dk) normalised keys, u (B, H, N, Dv) the solved deltas, gsum (B, H, N) each node's
    path log-decay G_i; x (B, C, N) the nodes' pre-conv inputs (the conv window's source)."""

    k: torch.Tensor
    u: torch.Tensor
    gsum: torch.Tensor
    x: torch.Tensor


def tree_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          state: torch.Tensor | None, visibility: torch.Tensor):
    """Gated delta rule over a tree, every node from its own path (see the module docstring).

    q, k: (B, N, H, Dk) (already repeated to the value heads, l2-normalised; q scaled by Dk^-1/2);
    v: (B, N, H, Dv); g, beta: (B, N, H) (log decay <= 0, write strength); state: (B, H, Dk, Dv) the
    state before the root, or None (zeros); visibility: (B, N, N) bool, [b, i, j] = j is i or an
    ancestor of i, ancestors before descendants in node order.
    Returns o (B, N, H, Dv) float32 and (k, u, gsum) for `path_state` (the keys as (B, H, N, Dk)).
    """
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, N, D)
    g, beta = g.transpose(1, 2).float(), beta.transpose(1, 2).float()  # (B, H, N)
    B, H, N, Dk = k.shape
    vis = visibility[:, None].to(q.device)  # (B, 1, N, N)
    gsum = torch.einsum("bij,bhj->bhi", visibility.to(g.dtype), g)  # (B, H, N): G_i over i's path
    diff = (gsum[..., :, None] - gsum[..., None, :]).masked_fill(~vis, float("-inf"))
    decay = diff.exp()  # (B, H, N, N): e^{G_i - G_j} on the path, 0 elsewhere
    eye = torch.eye(N, dtype=torch.bool, device=q.device)
    m = beta[..., :, None] * (decay.masked_fill(eye, 0.0) * (k @ k.transpose(-1, -2)))  # strict ancestors only
    rhs = v
    if state is not None:
        s0 = state.float()
        rhs = v - gsum.exp()[..., None] * (k @ s0)  # (B, H, N, Dv)
    rhs = beta[..., None] * rhs
    u = torch.linalg.solve_triangular(m + eye, rhs, upper=False, unitriangular=True)  # (B, H, N, Dv): (I + M) U = R
    o = (decay * (q @ k.transpose(-1, -2))) @ u
    if state is not None:
        o = o + gsum.exp()[..., None] * (q @ s0)
    return o.transpose(1, 2), (k, u, gsum)


def path_state(state: torch.Tensor | None, rec: TreeRecurrence, on_path: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """The recurrent state after a path: S_leaf = e^{G_leaf} S_0 + sum_{j on the path} e^{G_leaf - G_j} k_j u_j^T.

    state: (B, H, Dk, Dv) before the root (None: zeros); on_path: (B, N) bool, the leaf and its
    ancestors; leaf: (B,) long node index. Returns (B, H, Dk, Dv) float32."""
    g_leaf = rec.gsum.gather(2, leaf[:, None, None].expand(-1, rec.gsum.shape[1], 1))  # (B, H, 1)
    # masked before the exp: off the path G_leaf - G_j may be large and positive (inf * 0 would be nan)
    w = (g_leaf - rec.gsum).masked_fill(~on_path[:, None], float("-inf")).exp()  # (B, H, N)
    out = torch.einsum("bhn,bhnk,bhnv->bhkv", w, rec.k, rec.u)
    if state is not None:
        out = out + g_leaf[..., None].exp() * state.float()
    return out


def path_conv_state(conv_state: torch.Tensor, x: torch.Tensor, path: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The conv state after a path: the last S inputs of [conv_state, the path's inputs up to depth last].

    conv_state: (B, C, S); x: (B, C, N) the nodes' pre-conv inputs; path: (B, P) long node per depth
    (root first); last: (B,) long depth of the last kept node. Returns (B, C, S)."""
    B, C, S = conv_state.shape
    src = torch.cat([conv_state, x.gather(2, path[:, None].expand(B, C, path.shape[1])).to(conv_state.dtype)], -1)
    idx = last[:, None] + 1 + torch.arange(S, device=x.device)  # (B, S): columns ending at the last node
    return src.gather(2, idx[:, None].expand(B, C, S))


@dataclass
class TreeStates:
    """A hybrid target's tree verify, as its linear-attention layers saw it and recorded it.

    visibility (B, N, N) bool and ancestors (B, N, D + 1) long (`tree.ancestor_matrix` /
    `tree.ancestors_by_depth`), depths (B, N) long; layers: {layer index: its `TreeRecurrence`},
    filled by the layers during the forward."""

    visibility: torch.Tensor
    ancestors: torch.Tensor
    depths: torch.Tensor
    layers: dict

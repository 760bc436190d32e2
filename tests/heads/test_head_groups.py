"""Grouping a `hook_z` dictionary's latents by head (`saelab.circuits.groups`) on a model with two heads in layer 1:
each latent goes to the head that its direct feature attribution falls on, which is the head whose block of the
decoder row carries the latent (the two heads write different things: the token after the earlier occurrence,
and the previous token)."""

from __future__ import annotations

from saelab.circuits import grouping, induction_task

HOOK = "blocks.1.attn.hook_z"


def test_latents_go_to_the_head_that_writes_them(two_heads, two_heads_sae):
    task = induction_task(two_heads, n=32, length=10)
    groups = grouping(two_heads, {HOOK: two_heads_sae}, task, latents="head", positions="all")
    labels = groups.latents[HOOK]
    assert labels[-1] == "err" and set(labels[:-1]) == {"L1H0", "L1H1"}
    d_head = two_heads.cfg.d_head
    blocks = two_heads_sae.W_dec.detach().view(-1, 2, d_head).norm(dim=-1)  # [latents, heads]
    fired = (two_heads_sae.encode(two_heads.run_with_cache(task.tokens)[1][HOOK].flatten(2)) > 0).any(1).any(0)
    clear = fired & (blocks.max(1).values > 3 * blocks.min(1).values)
    assert clear.sum() >= 10
    agree = [labels[i] == f"L1H{int(blocks[i].argmax())}" for i in clear.nonzero().flatten().tolist()]
    assert sum(agree) / len(agree) >= 0.9, agree

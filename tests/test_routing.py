"""PDSR: stream statistics, block routing, and the same draw on every rank."""

from __future__ import annotations

import math

from collectionlora.distill.routing import EFFECT, GENERAL, StreamRouter


def _config(tiny_params, **changes):
    return tiny_params.distill.model_copy(update=changes)


def test_effect_share_matches_p_switch(tiny_params):
    steps = 4000
    for p in (0.5, 0.2):
        router = StreamRouter(_config(tiny_params, p_switch=p), rank=0)
        share = sum(router.stream(s) == EFFECT for s in range(steps)) / steps
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / steps)


def test_extremes_and_pdsr_off(tiny_params):
    assert {StreamRouter(_config(tiny_params, p_switch=0.0), 0).stream(s) for s in range(200)} == {GENERAL}
    assert {StreamRouter(_config(tiny_params, p_switch=1.0), 0).stream(s) for s in range(200)} == {EFFECT}
    assert {StreamRouter(_config(tiny_params, pdsr=False, p_switch=0.0), 0).stream(s) for s in range(200)} == {EFFECT}


def test_reference_blocks_hold_a_draw_for_route_every_steps(tiny_params):
    router = StreamRouter(_config(tiny_params, route_every=20), rank=0)
    streams = [router.stream(s) for s in range(400)]
    assert all(len(set(streams[b : b + 20])) == 1 for b in range(0, 400, 20))
    assert len(set(streams)) == 2


def test_synced_ranks_draw_identically_and_unsynced_ranks_do_not(tiny_params):
    synced = [StreamRouter(_config(tiny_params, sync_routing=True), rank) for rank in range(4)]
    assert all([r.stream(s) for s in range(300)] == [synced[0].stream(s) for s in range(300)] for r in synced)
    own = [StreamRouter(_config(tiny_params, sync_routing=False), rank) for rank in range(2)]
    assert [own[0].stream(s) for s in range(300)] != [own[1].stream(s) for s in range(300)]


def test_routing_is_a_pure_function_of_the_step(tiny_params):
    """Resuming needs no router state: a fresh router gives the same stream for any step."""
    first, second = StreamRouter(_config(tiny_params), 0), StreamRouter(_config(tiny_params), 0)
    assert [first.stream(s) for s in range(100, 200)] == [second.stream(s) for s in reversed(range(100, 200))][::-1]

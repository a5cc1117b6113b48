"""The joint (K, V) polish after coordinate descent in model-level clip selection."""

from __future__ import annotations

from oscar_kv.evals.clip_select import DEFAULT_GRID_K, DEFAULT_GRID_V, _polish

GK, GV = sorted(DEFAULT_GRID_K), sorted(DEFAULT_GRID_V)


def test_polish_walks_to_the_joint_minimum():
    # a valley along the diagonal: coordinate descent from V = 1 stops at (0.94, 0.96),
    # the joint minimum is at (0.96, 0.94)
    target = (0.96, 0.94)
    calls = []

    def score(k, v):
        calls.append((k, v))
        return (k - target[0]) ** 2 + (v - target[1]) ** 2 + 0.5 * (k - v - 0.02) ** 2

    ck, cv, path = _polish(score, GK, GV, 0.94, 0.96)
    assert (ck, cv) == target
    assert path and path[-1] == list(target)


def test_polish_keeps_a_local_minimum_and_breaks_ties_towards_less_clipping():
    ck, cv, path = _polish(lambda k, v: abs(k - 0.95) + abs(v - 0.96), GK, GV, 0.95, 0.96)
    assert (ck, cv, path) == (0.95, 0.96, [])
    # flat objective except the start: every neighbour ties -> the least clipping one
    ck, cv, path = _polish(lambda k, v: 0.0 if (k, v) != (0.95, 0.96) else 1.0, GK, GV,
                           0.95, 0.96)
    assert (ck, cv) == (0.96, 0.98) and len(path) == 1


def test_polish_stays_on_the_grid_edges():
    ck, cv, _ = _polish(lambda k, v: -k - v, GK, GV, 0.99, 0.98)
    assert (ck, cv) == (1.0, 1.0)

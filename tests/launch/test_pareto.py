"""The Pareto maths of a sweep's front (gdnsq.launch.sweep.pareto): exact, no Ray or MLflow."""

from gdnsq.launch.sweep.pareto import front_kind, front_tags, is_front_sweep, mark_fronts, pareto_front


def test_front_keeps_exactly_the_non_dominated_points_in_order_of_cost():
    # (top-1, bytes)
    points = [(90.0, 300), (80.0, 100), (85.0, 200), (84.0, 250), (90.0, 400), (70.0, 100), (95.0, 500)]
    # 3 is dominated by 2 (more accurate, smaller); 4 by 0 (as accurate, smaller); 5 by 1 (same size, less accurate)
    assert pareto_front(points) == [1, 2, 0, 6]


def test_ties_in_both_figures_are_all_on_the_front_or_all_off():
    assert pareto_front([(80.0, 100), (80.0, 100), (90.0, 200)]) == [0, 1, 2]
    assert pareto_front([(80.0, 100), (80.0, 100), (90.0, 50)]) == [2]
    # equal cost: the most accurate only; equal accuracy: the smallest only
    assert pareto_front([(80.0, 100), (81.0, 100)]) == [1]
    assert pareto_front([(80.0, 100), (80.0, 99)]) == [1]


def test_front_of_nothing_and_of_one():
    assert pareto_front([]) == []
    assert pareto_front([(0.0, 1)]) == [0]


def _row(tid, top1, size, bops, converged=True, status="completed"):
    return {
        "trial_id": tid,
        "status": status,
        "test_converged": converged,
        "test_top1": top1,
        "bytes_payload": size,
        "bops": bops,
    }


def test_mark_fronts_counts_only_converged_trials_that_ran_to_the_end():
    rows = [
        _row("a", 80.0, 100, 9e6),
        _row("b", 85.0, 200, 5e6),  # on both fronts: b's BOPs are the lowest
        _row("c", 99.0, 50, 1e6, converged=False),  # would dominate everything, but is over its budget
        _row("d", 99.0, None, None, status="stopped"),  # stopped early: no run summary, no figures
        _row("e", 84.0, 300, 8e6),  # dominated on both
        _row("f", 90.0, 400, None),  # no BOPs figure: a point of the bytes front only
    ]
    front = mark_fronts(rows, "bytes")
    assert front == {"primary": "bytes", "bytes": ["a", "b", "f"], "bops": ["b"]}
    assert [r["trial_id"] for r in rows if r["front_bytes"]] == ["a", "b", "f"]
    assert [r["trial_id"] for r in rows if r["front_bops"]] == ["b"]
    assert [r["pareto_front"] for r in rows] == [r["front_bytes"] for r in rows]
    assert mark_fronts(rows, "bops")["primary"] == "bops"
    assert [r["trial_id"] for r in rows if r["pareto_front"]] == ["b"]


def test_no_front_without_size_figures():
    rows = [_row("a", 80.0, None, None), _row("b", 90.0, 10, 10, converged=False)]
    assert mark_fronts(rows) is None and "front_bytes" not in rows[0]


def test_tags_and_kinds():
    row = {"pareto_front": True, "front_bytes": True, "front_bops": False}
    assert front_tags(row, "s", {"primary": "bytes"}) == {
        "sweep": "s",
        "pareto_front": "true",
        "pareto_front_bytes": "true",
        "pareto_front_bops": "false",
    }
    assert front_tags(row, "s", None) == {"sweep": "s"}
    assert (front_kind("bytes"), front_kind("avg_bits_w"), front_kind("bops")) == ("bytes", "bytes", "bops")
    assert is_front_sweep({"quant.budget.value": {}}) and not is_front_sweep({"optim.lr": {}})

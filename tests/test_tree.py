"""kgen_cli.tree: TGTS and independent sampling over the BranchDecoder protocol (fake decoder)."""

from __future__ import annotations

import json
import math

import pytest

import kgen_cli.tree as tree
from kgen_cli.errors import EngineError
from kgen_cli.tree import (
    BranchPoolExhausted,
    Sampled,
    allowed_children,
    expansion_need,
    independent_sample,
    segment_score,
    select,
    tgts_sample,
    uct,
    widening_alpha,
)

from fake_decoder import EOG, SEP, TREE_DEFAULTS, FakeDecoder, FakeModel, make_prompt  # tests/ is on sys.path

PROMPT = make_prompt()
SHORT = FakeModel(tags=10, tags_spread=3)  # ~3 segments per variant: quick large runs


def run_tgts(n, *, seed=1, max_branches=256, model=None, **kw):
    dec = FakeDecoder(max_branches, model or FakeModel())
    return dec, tgts_sample(dec, PROMPT, n, TREE_DEFAULTS, seed, **kw)


def assert_all_released(dec: FakeDecoder) -> None:
    assert dec.live_seqs == 0, "sequence ids leaked"
    assert dec.live_cells == 0
    assert not dec.live_samplers, "samplers leaked"


def recomputed_score(dec: FakeDecoder, variant, group_size=4, max_tokens=512) -> float:
    """The variant's score rebuilt from the fake model's raw probabilities over its own text.
    Equal to what the sampler reported only if every token was sampled from a sequence whose KV
    held exactly this history (forks, replays and reuse all right)."""
    tokens = variant.tokens + ([EOG] if variant.finish_reason == "stop" else [])
    group, scores, history = tree._Group(), [], list(PROMPT)
    for i, t in enumerate(tokens):
        piece = dec.model.piece(t)
        group.add(Sampled(t, dec.raw_probs_after(history)[t], piece, t == EOG, piece.count(b",")))
        history.append(t)
        if group.complete(group_size) or i + 1 >= max_tokens:
            scores.append(group.score())
            group = tree._Group()
    assert not group.tokens
    return sum(scores) / len(scores)


def node(parent=None, *, visits=0, value=0.0, active=True, spent=False):
    n = tree._Node(parent, [SEP], [b","], 0.0)
    n.visits, n.value, n.active, n.spent = visits, value, active, spent
    if parent is not None:
        parent.children.append(n)
    return n


# ---------------------------------------------------------------- rules (docs/design.md#tgts)

PEERS_TABLE = {  # depth -> allowed children for visits 1, 2, 5, 10, 50, 100, 1000, 10000
    0: [2, 2, 3, 3, 4, 5, 8, 15],
    1: [2, 2, 2, 3, 3, 4, 6, 8],
    2: [2, 2, 2, 2, 3, 3, 4, 5],
    3: [2, 2, 2, 2, 2, 2, 3, 3],
}


@pytest.mark.parametrize("depth", sorted(PEERS_TABLE))
def test_widening_matches_the_peers_table(depth):
    visits = [1, 2, 5, 10, 50, 100, 1000, 10000]
    assert [allowed_children(v, depth) for v in visits] == PEERS_TABLE[depth]


def test_widening_alpha_and_zero_visits():
    assert [round(widening_alpha(d), 4) for d in range(4)] == [0.25, 0.1876, 0.125, 0.0704]
    assert allowed_children(0, 0) == 0


def test_uct():
    assert uct(0.0, 0, 10, 1.0) == math.inf
    assert uct(1.5, 3, 10, 2.0) == pytest.approx(0.5 + 2.0 * math.sqrt(math.log(10) / 3))


def test_select_takes_the_best_uct_child():
    root = node(visits=20)  # 20 visits allow 3 children at depth 0: all there, descend
    node(root, visits=10, value=1.0)  # 0.1 + sqrt(ln 20 / 10) = 0.647
    best = node(root, visits=5, value=0.5)  # 0.1 + sqrt(ln 20 / 5) = 0.874
    node(root, visits=5, value=0.0)  # 0.0 + 0.774
    assert select(root, 1.0) == [root, best]
    assert select(root, 0.0) == [root, root.children[0]]  # pure exploitation: a tie goes to the older


def test_select_never_enters_spent_or_inactive_children():
    root = node(visits=5)
    spent = node(root, visits=1, value=9.0, spent=True)  # a leaf with a huge score
    inactive = node(root, visits=0, active=False)  # infinite UCT, but not active yet
    live = node(root, visits=3, value=0.1)
    path = select(root, 1.0)
    assert path == [root, live]
    assert spent not in path and inactive not in path


def test_select_stops_where_the_node_may_still_widen():
    root = node(visits=10)  # allows 3 children at depth 0
    node(root, visits=4)
    node(root, visits=4)
    assert select(root, 1.0) == [root]
    root.pending = 1  # a child segment in flight counts as a child
    assert len(select(root, 1.0)) == 2


def test_select_stops_when_no_child_is_open():
    root = node(visits=1)
    node(root, visits=1, spent=True)
    node(root, visits=1, spent=True)
    assert select(root, 1.0) == [root]


def test_expansion_need_follows_the_reference():
    root = node(visits=5)  # allows 3
    node(root, visits=1, spent=True)
    assert expansion_need(root) == 3  # room against all children, fill up to 3 *unspent*
    node(root)
    node(root)
    assert expansion_need(root) == 0  # 3 children already: no room


def test_segment_score_skips_the_final_token():
    # tokens 5, 6 scored; the two separators (equal to the final token) are skipped
    expected = (0.2 + 0.5 + math.sqrt(0.5 * 0.2)) / 3
    assert segment_score([5, SEP, 6, SEP], [0.5, 0.9, 0.2, 0.99]) == pytest.approx(expected)
    assert segment_score([EOG], [0.3]) == 0.0  # nothing left to score


def test_group_counts_separators_after_its_first_token():
    g = tree._Group()
    for tok, seps in [(SEP, 1), (7, 0), (SEP, 1), (SEP, 2)]:
        g.add(Sampled(tok, 0.5, b"," * seps, False, seps))
    assert g.separators == 3  # the first token's separator does not count
    assert not g.complete(4)
    g.add(Sampled(SEP, 0.5, b",", False, 1))
    assert g.complete(4)


# ---------------------------------------------------------------- TGTS runs


def test_tgts_returns_n_distinct_variants_and_releases_everything():
    dec, res = run_tgts(16)
    assert len(res.variants) == 16
    assert len({tuple(v.tokens) for v in res.variants}) == 16
    assert res.stats["stop_reason"] == "complete"
    assert all(v.finish_reason == "stop" and v.tokens and EOG not in v.tokens for v in res.variants)
    assert res.total_decoded == dec.tokens_fed  # NFE: every token fed to step(), prompt excluded
    assert sum(v.n_decoded for v in res.variants) <= res.total_decoded
    assert dec.start_calls == 1 and dec.prompt_tokens == len(PROMPT)
    assert_all_released(dec)


@pytest.mark.parametrize("max_branches", [3, 6, 256])
def test_every_token_is_sampled_from_the_right_history(max_branches):
    """Small pools force eviction, forks from descendants and replays; the scores prove that
    each token came from a sequence holding exactly that variant's history."""
    dec, res = run_tgts(24, max_branches=max_branches, model=SHORT, seed=3)
    assert len(res.variants) == 24
    for v in res.variants:
        assert recomputed_score(dec, v) == pytest.approx(v.score, abs=1e-12)
    if max_branches == 3:
        assert res.stats["replayed"] > 0 and res.stats["evictions"] > 0
    assert_all_released(dec)


def test_spent_leaves_are_never_selected_again(monkeypatch):
    selected = []

    def spy(root, c):
        path = select(root, c)
        selected.append(path[-1])
        return path

    monkeypatch.setattr(tree, "select", spy)
    _, res = run_tgts(32, model=SHORT)
    assert selected and not any(n.spent or n.leaf for n in selected)
    nodes = res.tree["nodes"]
    leaves = [n for n in nodes if n["leaf"]]
    assert all(n["spent"] and not n["children"] for n in leaves)
    assert sorted(n["variant"] for n in leaves if n["variant"] is not None) == list(range(32))


def test_sequence_ids_are_reused():
    dec, res = run_tgts(40, max_branches=8, model=SHORT)
    assert len(res.variants) == 40
    assert set(dec.allocations) <= set(range(8))
    assert len(dec.allocations) > 8  # freed ids came back
    assert dec.peak_live <= 8


def test_more_variants_than_ids_are_queued_not_crashed():
    dec, res = run_tgts(60, max_branches=4, model=SHORT)
    assert len(res.variants) == 60
    assert dec.peak_live <= 4
    assert res.stats["peak_live_seqs"] <= 4
    assert_all_released(dec)


def test_an_engine_that_runs_out_before_its_advertised_size():
    dec = FakeDecoder(64, SHORT, pool_size=5)  # fork raises BranchPoolExhausted at 5 live ids
    res = tgts_sample(dec, PROMPT, 30, TREE_DEFAULTS, 2)
    assert len(res.variants) == 30
    assert dec.peak_live <= 5
    assert_all_released(dec)


def test_1024_variants_with_256_ids_stay_bounded():
    dec, res = run_tgts(1024, model=SHORT, seed=5)
    assert len(res.variants) == 1024
    assert dec.peak_live <= 256
    # KV cells are shared: far fewer than one private copy per variant
    assert dec.peak_cells <= 256 * (len(PROMPT) + 512)
    assert dec.peak_cells < sum(len(PROMPT) + len(v.tokens) for v in res.variants) / 4
    assert_all_released(dec)


@pytest.mark.parametrize("max_branches", [4, 256])
def test_the_tree_mirrors_the_kv_cells_exactly(max_branches):
    dec, res = run_tgts(48, max_branches=max_branches, model=SHORT)
    assert res.stats["peak_cells"] == dec.peak_cells


def test_max_cells_keeps_the_tree_inside_the_context():
    max_tokens = 128
    cells = len(PROMPT) + 4 * max_tokens  # room for about four full-length branches
    free_run = run_tgts(32, max_tokens=max_tokens)[0]
    assert free_run.peak_cells > cells  # without the limit the tree would overflow it
    dec, res = run_tgts(32, max_tokens=max_tokens, max_cells=cells)
    assert len(res.variants) == 32
    assert dec.peak_cells <= cells
    for v in res.variants:
        assert recomputed_score(dec, v, max_tokens=max_tokens) == pytest.approx(v.score, abs=1e-12)
    assert_all_released(dec)
    with pytest.raises(EngineError, match="cannot hold"):
        run_tgts(4, max_tokens=max_tokens, max_cells=len(PROMPT) + max_tokens - 1)


@pytest.mark.parametrize("max_branches", [3, 256])
def test_a_context_for_exactly_one_branch_still_completes(max_branches):
    cells = len(PROMPT) + 64
    dec, res = run_tgts(8, max_tokens=64, max_cells=cells, max_branches=max_branches)
    assert len(res.variants) == 8 and res.stats["stop_reason"] == "complete"
    assert dec.peak_cells <= cells
    assert max(dec.batch_sizes) == 1  # one branch at a time is all that fits
    assert_all_released(dec)


def test_one_segment_variants_do_not_stall_on_empty_expansions():
    """Outputs shorter than a group make every child of the root a spent leaf; the reference
    would need ~1e9 empty expansions for 128 root children. We widen after NOOP_LIMIT."""
    dec, res = run_tgts(128, model=FakeModel(tags=3, tags_spread=2))
    assert len(res.variants) == 128
    assert res.stats["forced"] > 0
    assert res.stats["noops"] < 1000 * tree.NOOP_LIMIT


def test_one_segment_outputs_grow_in_parallel():
    """Every child of the root a leaf: the root widens by empty expansions as the leaves come
    in (made in one go there), so the variants are decoded side by side, not one or two at a
    time, for about the tokens of the reference's one-at-a-time order."""
    one_segment = FakeModel(tags=2, tags_spread=1)  # at most 3 tags: always one group of 4
    dec, res = run_tgts(64, model=one_segment)
    assert len(res.variants) == 64 and all(v.depth == 1 for v in res.variants)
    assert max(dec.batch_sizes) >= 32
    sequential = tgts_sample(FakeDecoder(256, one_segment), PROMPT, 64, TREE_DEFAULTS, 1, max_jobs=1)
    assert res.n_steps * 2 < sequential.n_steps
    assert res.total_decoded < 1.1 * sequential.total_decoded
    assert_all_released(dec)


def test_widening_counts_real_visits_and_waits_for_open_children():
    """Multi-segment outputs: while the first segments are in flight the root has 2 children
    (1 visit while simulated from), as the reference's widening table says."""
    dec = StepRecorder(256, FakeModel())
    res = tgts_sample(dec, PROMPT, 16, TREE_DEFAULTS, 1)
    assert dec.batch_sizes[:5] == [2] * 5  # a simulation and one expansion child of the root
    assert len(res.variants) == 16


class HistoryRecorder(FakeDecoder):
    """Checks that each new sampler is told the generated tokens of the text it continues."""

    def __init__(self, *a, penalized=True, **kw):
        super().__init__(*a, **kw)
        self.checked = 0
        self.penalized = penalized

    def sample(self, seq, sampler, **kw):
        if not getattr(sampler, "verified", False):
            generated = self.history(seq)[len(PROMPT):]
            assert sampler.history == (generated[-64:] if self.penalized else [])
            sampler.verified = True
            self.checked += 1
        return super().sample(seq, sampler, **kw)


def test_each_segment_sampler_gets_the_path_history_for_the_repetition_penalty():
    penalized = TREE_DEFAULTS.with_overrides(repeat_penalty=1.2)
    dec = HistoryRecorder(256, SHORT)
    res = tgts_sample(dec, PROMPT, 24, penalized, 3)
    assert len(res.variants) == 24 and dec.checked == res.stats["segments"]
    plain = HistoryRecorder(256, SHORT, penalized=False)
    res = tgts_sample(plain, PROMPT, 4, TREE_DEFAULTS, 3)  # no penalty: nothing to tell
    assert plain.checked == res.stats["segments"]


def test_deterministic_for_a_seed():
    runs = [run_tgts(24, seed=s, max_branches=6, model=SHORT)[1] for s in (9, 9, 10)]
    assert [v.tokens for v in runs[0].variants] == [v.tokens for v in runs[1].variants]
    assert runs[0].tree == runs[1].tree
    assert [v.tokens for v in runs[0].variants] != [v.tokens for v in runs[2].variants]


class StepRecorder(FakeDecoder):
    """Records each step's fed sequences and the samples taken before the next step."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log: list[tuple[dict[int, int], list[int]]] = []

    def step(self, feeds):
        super().step(feeds)
        self.log.append(({s: self.length(s) for s in feeds}, []))

    def sample(self, seq, sampler):
        self.log[-1][1].append(seq)
        return super().sample(seq, sampler)


def test_all_growing_segments_share_one_step_per_token():
    dec = StepRecorder(256, FakeModel())
    res = tgts_sample(dec, PROMPT, 64, TREE_DEFAULTS, 4)
    assert res.n_steps == dec.n_steps == len(dec.log)
    assert res.n_steps < res.total_decoded / 8  # parallel growth, not one segment at a time
    for fed, sampled in dec.log[:-1]:
        assert sorted(sampled) == sorted(fed)  # every fed sequence sampled once before the next step
    assert any(len(set(lengths.values())) > 3 for lengths, _ in dec.log)  # different depths, one step
    sequential = tgts_sample(FakeDecoder(256, FakeModel()), PROMPT, 64, TREE_DEFAULTS, 4, max_jobs=1)
    assert sequential.n_steps > 3 * res.n_steps


def test_a_model_that_repeats_itself_stops_early():
    greedy = TREE_DEFAULTS.with_overrides(temperature=0.0)
    dec = FakeDecoder(16, SHORT)
    res = tgts_sample(dec, PROMPT, 8, greedy, 0, max_tokens=64)
    assert len(res.variants) == 1  # every leaf is the same text
    assert res.stats["stop_reason"] == "duplicates"
    assert res.stats["duplicates"] == tree.DUPLICATE_STREAK
    assert_all_released(dec)


def test_the_token_budget_always_ends_the_run(monkeypatch):
    monkeypatch.setattr(tree, "BUDGET_FACTOR", 0.05)
    dec = FakeDecoder(16, FakeModel())
    res = tgts_sample(dec, PROMPT, 8, TREE_DEFAULTS, 0, max_tokens=512)
    assert res.stats["stop_reason"] == "budget" and len(res.variants) < 8
    assert res.stats["budget"] <= res.total_decoded <= res.stats["budget"] + 16 * 512
    assert_all_released(dec)


def test_max_tokens_makes_truncated_leaves():
    _, res = run_tgts(6, max_tokens=10)
    assert all(v.finish_reason == "length" and len(v.tokens) == 10 for v in res.variants)


def test_on_variant_and_tree_json():
    seen = []
    _, res = run_tgts(12, model=SHORT, on_variant=seen.append)
    assert seen == res.variants
    doc = json.loads(json.dumps(res.tree))
    nodes = doc["nodes"]
    assert doc["sampler"] == "tgts" and nodes[0]["parent"] is None
    assert all(nodes[c]["parent"] == n["id"] for n in nodes for c in n["children"])
    assert len(nodes) == res.stats["nodes"]


def test_accept_refuses_leaves_and_the_search_goes_on():
    found, refused = [], []

    def accept(v):  # the caller keeps only the first tag of a variant: many leaves collide
        first = v.text.split(",")[0]
        if first in found:
            refused.append(v)
            return False
        found.append(first)
        return True

    dec, res = run_tgts(6, model=SHORT, accept=accept)
    plain = run_tgts(6, model=SHORT)[1]
    assert len(res.variants) == 6 and [v.text.split(",")[0] for v in res.variants] == found
    assert refused and not any(r is v for r in refused for v in res.variants)
    assert res.stats["duplicates"] >= len(refused) and plain.stats["duplicates"] < len(refused)
    assert_all_released(dec)

    dec, res = run_tgts(4, model=SHORT, accept=lambda v: False)  # never satisfied: ends, never hangs
    assert res.variants == [] and res.stats["stop_reason"] in ("duplicates", "budget", "exhausted")
    assert_all_released(dec)


def test_decoder_errors_propagate_and_free_the_pool():
    class Failing(FakeDecoder):
        def step(self, feeds):
            if self.n_steps == 30:
                raise EngineError("decode failed")
            super().step(feeds)

    dec = Failing(16, SHORT)
    with pytest.raises(EngineError, match="decode failed"):
        tgts_sample(dec, PROMPT, 10, TREE_DEFAULTS, 0)
    assert_all_released(dec)


def test_bad_arguments():
    with pytest.raises(ValueError):
        tgts_sample(FakeDecoder(8), PROMPT, 0, TREE_DEFAULTS, 0)
    with pytest.raises(EngineError):
        tgts_sample(FakeDecoder(1), PROMPT, 2, TREE_DEFAULTS, 0)
    with pytest.raises(EngineError):
        independent_sample(FakeDecoder(1), PROMPT, 2, TREE_DEFAULTS, 0)


# ---------------------------------------------------------------- independent


def test_independent_decodes_the_prompt_once_and_steps_together():
    dec = FakeDecoder(64)
    res = independent_sample(dec, PROMPT, 16, TREE_DEFAULTS, 7)
    assert dec.start_calls == 1 and dec.prompt_tokens == len(PROMPT)
    assert dec.forks == 16
    assert len(res.variants) == 16
    assert res.total_decoded == dec.tokens_fed == sum(v.n_decoded for v in res.variants)
    assert res.n_steps == max(len(v.tokens) + 1 for v in res.variants)  # all lanes in every step
    assert all(v.n_decoded == len(v.tokens) + 1 for v in res.variants)  # prompt's last token + all but EOG
    for v in res.variants:
        assert recomputed_score(dec, v) == pytest.approx(v.score, abs=1e-12)
    assert_all_released(dec)


def test_independent_refills_beyond_the_pool_with_the_same_results():
    wide = independent_sample(FakeDecoder(256), PROMPT, 40, TREE_DEFAULTS, 3)
    dec = FakeDecoder(5)
    narrow = independent_sample(dec, PROMPT, 40, TREE_DEFAULTS, 3)
    assert [v.tokens for v in narrow.variants] == [v.tokens for v in wide.variants]  # seed per index
    assert dec.peak_live <= 5
    assert narrow.n_steps > wide.n_steps
    assert_all_released(dec)


def test_independent_respects_max_cells():
    cells = len(PROMPT) + 3 * 200
    dec = FakeDecoder(64)
    res = independent_sample(dec, PROMPT, 12, TREE_DEFAULTS, 2, max_tokens=200, max_cells=cells)
    assert len(res.variants) == 12
    assert dec.peak_cells <= cells and dec.peak_live <= 4  # anchor + 3 variants at a time
    with pytest.raises(EngineError, match="cannot hold"):
        independent_sample(FakeDecoder(8), PROMPT, 2, TREE_DEFAULTS, 2, max_tokens=200,
                           max_cells=len(PROMPT) + 199)


def test_independent_json_and_callback():
    seen = []
    res = independent_sample(FakeDecoder(8), PROMPT, 5, TREE_DEFAULTS, 1, on_variant=seen.append)
    assert sorted(seen, key=lambda v: res.variants.index(v)) == res.variants
    doc = json.loads(json.dumps(res.tree))
    assert doc["sampler"] == "independent" and len(doc["nodes"]) == 6


def test_independent_accept_replaces_refused_samples_in_the_same_batch():
    plain = independent_sample(FakeDecoder(64), PROMPT, 12, TREE_DEFAULTS, 4)
    seen_first, refused = set(), []

    def accept(v):  # the caller keeps only the first word of a variant: samples collide
        first = v.text.split()[0]
        if first in seen_first:
            refused.append(v.index)
            return False
        seen_first.add(first)
        return True

    dec = FakeDecoder(64)
    res = independent_sample(dec, PROMPT, 6, TREE_DEFAULTS, 4, accept=accept)
    assert refused and res.stats["duplicates"] == len(refused)
    assert len(res.variants) == 6 and len({v.text.split()[0] for v in res.variants}) == 6
    assert [v.index for v in res.variants] == sorted(set(range(6 + len(refused))) - set(refused))
    by_index = {v.index: v.tokens for v in plain.variants}  # sample i has seed derive_seed(4, i), always
    assert all(v.tokens == by_index[v.index] for v in res.variants)
    assert res.n_steps < 2 * max(len(v.tokens) + 1 for v in res.variants)  # one batch, not a second pass
    assert_all_released(dec)

    dec = FakeDecoder(64)
    res = independent_sample(dec, PROMPT, 4, TREE_DEFAULTS, 4, accept=lambda v: False)  # never satisfied
    assert res.variants == [] and res.stats["duplicates"] == 8  # 4 samples + at most 4 replacements
    assert_all_released(dec)


# ---------------------------------------------------------------- the fake keeps everyone honest


def test_fake_decoder_rejects_protocol_misuse():
    dec = FakeDecoder(2)
    root = dec.start(PROMPT)
    sampler = dec.new_sampler(TREE_DEFAULTS, 0)
    with pytest.raises(AssertionError, match="outside"):
        dec.fork(root, len(PROMPT) + 1)
    child = dec.fork(root, len(PROMPT) - 1)
    with pytest.raises(BranchPoolExhausted):
        dec.fork(root, 1)
    with pytest.raises(AssertionError, match="pending"):
        dec.sample(child, sampler)  # nothing decoded on it yet
    dec.step({child: [PROMPT[-1]]})
    with pytest.raises(AssertionError, match="pending"):
        dec.sample(root, sampler)  # the prompt's logits died with that step
    dec.sample(child, sampler)
    with pytest.raises(AssertionError, match="pending"):
        dec.sample(child, sampler)  # one sample per logits row
    with pytest.raises(AssertionError, match="EOG"):
        dec.step({child: [EOG]})
    assert dec.live_cells == len(PROMPT) + 1  # the shared prompt is stored once
    sampler.free()
    dec.free(child)
    dec.free(root)
    assert_all_released(dec)


def test_fake_model_tags_are_three_to_six_tokens():
    res = independent_sample(FakeDecoder(64), PROMPT, 32, TREE_DEFAULTS, 0)
    lengths = [len(tag.split()) + 1 for v in res.variants for tag in v.text.split(",")[:-1]]
    assert min(lengths) >= 3 and max(lengths) <= 6
    assert 3.5 <= sum(lengths) / len(lengths) <= 5.5


def test_token_benchmark_runs_and_tree_saves_tokens_at_large_n():
    """benchmarks/tgts_tokens.py stays runnable; at N = 256 the tree shares most of its tokens."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "tgts_tokens.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--seeds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout  # fmt: skip
    rows = {int(line.split()[0]): line.split() for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert sorted(rows) == [4, 8, 16, 32, 64, 128, 256]
    ratio, no_waste = float(rows[256][3]), float(rows[256][4])
    assert 0 < no_waste <= ratio < 0.6
    assert "Target TGTS <= 0.6x independent at N=16" in out

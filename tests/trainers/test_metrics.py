"""Metrics: firing window, dead/dense fractions, FVU, CE loss recovered with a spliced reconstruction."""

import contextlib

import torch

from trainers.metrics import FiringTracker, ce_loss_recovered, explained_variance, fvu, l0, splice_metrics
from trainers.plots import firing_frequency_histogram


def test_firing_tracker_window_dead_and_dense():
    tracker = FiringTracker(4, window_tokens=10)
    acts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.0], [2.0, 0.0], [0.0005, 0.0]])
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 1], [2, 1]])
    tracker.update(acts, idx)  # 5 tokens: latent 0 fires 3 times, latent 1 once, 2 below 1e-3, 3 never
    assert tracker.dead_fraction() == 0.0
    tracker.update(torch.zeros(6, 2), torch.zeros(6, 2, dtype=torch.long))
    assert tracker.dead_mask().tolist() == [False, False, True, True]  # 2, 3: 11 tokens ≥ window
    assert tracker.dead_fraction() == 0.5
    assert torch.allclose(tracker.firing_frequencies(), torch.tensor([3 / 11, 1 / 11, 0.0, 0.0]))
    assert tracker.dense_fraction() == 0.25
    assert l0(acts) == 1.0


def test_firing_tracker_shorter_than_its_window_says_so_and_counts_never_fired():
    tracker = FiringTracker(3, window_tokens=100)
    for batch in range(9):  # 90 tokens: latent 0 fires in the first batch only, 1 in every batch, 2 never
        tracker.update(torch.tensor([[1.0, 1.0]] * 10), torch.tensor([[1, 0 if batch == 0 else 1]] * 10))
    assert not tracker.window_complete
    assert tracker.dead_fraction() == 0.0  # nothing can be dead before one whole window
    assert tracker.never_fired_mask().tolist() == [False, False, True]
    assert abs(tracker.never_fired_fraction() - 1 / 3) < 1e-6  # float32 mean


def test_a_latent_that_stops_firing_is_dead_exactly_one_window_later():
    tracker = FiringTracker(2, window_tokens=40)
    latent_0_fires = [True] * 5 + [False] * 8  # fires in batches 0..4 (10 tokens each), then never again
    dead_after = []
    for fires in latent_0_fires:
        tracker.update(torch.tensor([[1.0, 1.0 if fires else 0.0]] * 10), torch.tensor([[1, 0]] * 10))
        dead_after.append(tracker.dead_mask().tolist())
    assert tracker.window_complete and tracker.never_fired_fraction() == 0.0
    # silent from batch 5 on: 40 tokens without firing after batch 8, dead from then on; latent 1 never dies
    assert [d[0] for d in dead_after] == [False] * 8 + [True] * 5
    assert not any(d[1] for d in dead_after)
    assert tracker.dead_fraction() == 0.5


def test_fvu_and_explained_variance():
    x = torch.randn(100, 5)
    assert fvu(x, x) == 0.0
    assert abs(fvu(x, x.mean(0).expand_as(x)) - 1.0) < 1e-6
    assert abs(explained_variance(x, x) - 1.0) < 1e-9


def test_splice_metrics_on_a_toy_model():
    torch.manual_seed(0)
    embed, head = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 11)
    ids = torch.randint(0, 11, (2, 9))
    replace_fn = []

    def logits_of():
        h = embed(ids)
        return head(replace_fn[-1](h) if replace_fn else h)

    @contextlib.contextmanager
    def splice(replace):
        replace_fn.append(replace)
        yield
        replace_fn.pop()

    perfect = splice_metrics(logits_of, splice, lambda a: a, ids)
    assert abs(perfect["delta_lm_loss"]) < 1e-6 and abs(perfect["ce_loss_recovered"] - 1) < 1e-6
    zero = splice_metrics(logits_of, splice, torch.zeros_like, ids)
    assert abs(zero["ce_loss_recovered"]) < 1e-6
    assert ce_loss_recovered(2.0, 3.0, 4.0) == 0.5


def test_histogram_png(tmp_path):
    path = firing_frequency_histogram(torch.tensor([0.0, 1e-4, 1e-2, 0.2]).numpy(), tmp_path / "h.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

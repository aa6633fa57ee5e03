"""Tests for the photo-to-sketch generator G (sbir.models.sketch_generator)."""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sbir import strokes as S
from sbir.models.sketch_generator import (
    AdditiveAttention,
    MovingAverageBaseline,
    PhotoToSketchGenerator,
    SketchGeneratorConfig,
    bivariate_normal_log_prob,
    gmm_log_prob,
    reinforce_loss,
    train_on_strokes,
    with_start_token,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SBIR_SHARED_DATA", REPO.parent / "shared" / "data"))
SHEEP_NPZ = SHARED_DATA / "aaron_sheep" / "aaron_sheep.npz"


def small_config(**kw) -> SketchGeneratorConfig:
    base = dict(image_size=32, encoder_channels=(8, 16), feature_stride=4, latent_dim=8,
                decoder_hidden=32, attention_dim=16, num_mixtures=4, max_len=20,
                kl_anneal_steps=100)
    base.update(kw)
    return SketchGeneratorConfig(**base)


def small_model(seed: int = 0, **kw) -> PhotoToSketchGenerator:
    torch.manual_seed(seed)
    return PhotoToSketchGenerator(small_config(**kw), offset_scale=3.0)


def random_sketches(rng: np.random.Generator, n: int, lo: int = 3, hi: int = 15) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        s = np.zeros((k, 3), dtype=np.float32)
        s[:, :2] = rng.normal(0.0, 4.0, size=(k, 2))
        s[:, 2] = rng.random(k) < 0.2
        s[-1, 2] = 1.0
        out.append(s)
    return out


def padded_batch(rng, n=4, max_len=20):
    x, lengths = S.pad_stroke5(random_sketches(rng, n), max_len)
    return torch.as_tensor(x), torch.as_tensor(lengths)


# --------------------------------------------------------------------------
# likelihood pieces
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmm_log_prob_matches_explicit_mixture(seed):
    g = torch.Generator().manual_seed(seed)
    n, m = 7, 5
    dx, dy = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    pi = torch.randn(n, m, generator=g, dtype=torch.float64)
    mx, my = torch.randn(n, m, generator=g, dtype=torch.float64), torch.randn(n, m, generator=g, dtype=torch.float64)
    sx = torch.rand(n, m, generator=g, dtype=torch.float64) * 2 + 0.1
    sy = torch.rand(n, m, generator=g, dtype=torch.float64) * 2 + 0.1
    rho = (torch.rand(n, m, generator=g, dtype=torch.float64) * 2 - 1) * 0.95
    got = gmm_log_prob(dx, dy, pi, mx, my, sx, sy, rho)
    weights = torch.softmax(pi, dim=-1)
    for i in range(n):
        dens = 0.0
        for k in range(m):
            cov = torch.tensor([[sx[i, k] ** 2, rho[i, k] * sx[i, k] * sy[i, k]],
                                [rho[i, k] * sx[i, k] * sy[i, k], sy[i, k] ** 2]], dtype=torch.float64)
            mvn = torch.distributions.MultivariateNormal(torch.stack([mx[i, k], my[i, k]]), cov)
            lp_k = mvn.log_prob(torch.stack([dx[i], dy[i]]))
            assert torch.allclose(
                bivariate_normal_log_prob(dx[i], dy[i], mx[i, k], my[i, k], sx[i, k], sy[i, k], rho[i, k]),
                lp_k, atol=1e-9)
            dens = dens + weights[i, k] * torch.exp(lp_k)
        assert torch.allclose(got[i], torch.log(dens), atol=1e-9), (i, got[i], torch.log(dens))


def test_gmm_log_prob_is_stable_far_from_the_means():
    lp = gmm_log_prob(torch.tensor([50.0]), torch.tensor([-50.0]), torch.zeros(1, 3),
                      torch.zeros(1, 3), torch.zeros(1, 3), torch.full((1, 3), 0.1),
                      torch.full((1, 3), 0.1), torch.full((1, 3), 0.99))
    assert torch.isfinite(lp).all()


def test_additive_attention_module_sums_to_one():
    att = AdditiveAttention(feature_dim=6, query_dim=5, attention_dim=4)
    feats, q = torch.randn(3, 10, 6), torch.randn(3, 5)
    ctx, w = att(q, feats)
    assert ctx.shape == (3, 6) and w.shape == (3, 10)
    assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(ctx, torch.einsum("bn,bnd->bd", w, feats), atol=1e-6)


@pytest.mark.parametrize("stride,hw", [(4, 64), (8, 16)])
def test_forward_shapes_and_attention_normalised(stride, hw):
    cfg = small_config(encoder_channels=(8, 16, 16), feature_stride=stride)
    model = PhotoToSketchGenerator(cfg).eval()
    rng = np.random.default_rng(0)
    x, _ = padded_batch(rng, n=3)
    out = model(torch.randn(3, 3, 32, 32), x[:, :-1])
    t, m = x.shape[1] - 1, cfg.num_mixtures
    assert out["attention"].shape == (3, t, hw)
    assert torch.allclose(out["attention"].sum(-1), torch.ones(3, t), atol=1e-5)
    assert (out["attention"] >= 0).all()
    for k in ("pi_logits", "mu_x", "mu_y", "sigma_x", "sigma_y", "rho"):
        assert out[k].shape == (3, t, m), k
    assert out["pen_logits"].shape == (3, t, 3)
    assert (out["sigma_x"] > 0).all() and (out["rho"].abs() < 1).all()
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (3, cfg.latent_dim)


# --------------------------------------------------------------------------
# loss: masking and bookkeeping
# --------------------------------------------------------------------------


def test_loss_matches_manual_masked_computation():
    model = small_model().eval()
    rng = np.random.default_rng(1)
    x, lengths = padded_batch(rng, n=5)
    photos = torch.randn(5, 3, 32, 32)
    out = model.loss(photos, x, lengths, step=50)
    p = model(photos, x[:, :-1])
    tgt = x[:, 1:].clone()
    tgt[..., :2] /= model.offset_scale
    g_sum, g_n, p_sum, p_n = 0.0, 0, 0.0, 0
    for b in range(5):
        n = int(lengths[b])
        for t in range(n):
            pen = int(tgt[b, t, 2:].argmax())
            p_sum -= torch.log_softmax(p["pen_logits"][b, t], -1)[pen]
            p_n += 1
            if t < n - 1:  # offsets of real points only: the end row is excluded
                assert pen != 2
                g_sum -= gmm_log_prob(tgt[b, t, 0], tgt[b, t, 1], *(p[k][b, t] for k in
                                      ("pi_logits", "mu_x", "mu_y", "sigma_x", "sigma_y", "rho")))
                g_n += 1
            else:  # the end row IS in the pen CE
                assert pen == 2
    assert torch.allclose(out["gmm_nll"], g_sum / g_n, atol=1e-5)
    assert torch.allclose(out["pen_ce"], p_sum / p_n, atol=1e-5)
    kl_raw = -0.5 * torch.mean(1 + p["logvar"] - p["mu"] ** 2 - p["logvar"].exp())
    assert torch.allclose(out["kl"], torch.clamp(kl_raw, min=0.2), atol=1e-6)
    w = model.kl_weight_at(50)
    assert float(out["kl_weight"]) == pytest.approx(w)
    assert torch.allclose(out["total"], out["gmm_nll"] + out["pen_ce"] + w * out["kl"], atol=1e-5)


def test_loss_ignores_padding_rows():
    model = small_model().eval()
    rng = np.random.default_rng(2)
    x, lengths = padded_batch(rng, n=4)
    assert (lengths < x.shape[1] - 1).all()
    photos = torch.randn(4, 3, 32, 32)
    ref = model.loss(photos, x, lengths)
    garbage = x.clone()
    for b in range(4):
        n = int(lengths[b])
        garbage[b, 1 + n:] = torch.randn_like(garbage[b, 1 + n:]) * 100
    garbage[0, 1 + int(lengths[0]):, 0] = float("nan")
    out = model.loss(photos, garbage, lengths)
    for k in ("total", "gmm_nll", "pen_ce", "kl"):
        assert torch.equal(out[k], ref[k]), k
    out["total"].backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
    # but a real row does matter
    changed = x.clone()
    changed[0, 1, 0] += 5.0
    assert not torch.equal(model.loss(photos, changed, lengths)["total"], ref["total"])


def test_log_prob_ignores_padding_and_is_minus_summed_loss_terms():
    model = small_model().eval()
    rng = np.random.default_rng(3)
    x, lengths = padded_batch(rng, n=3)
    photos = torch.randn(3, 3, 32, 32)
    seq = x[:, 1:]
    lp = model.log_prob(photos, seq, lengths)
    g2 = seq.clone()
    g2[0, int(lengths[0]):] = 7.0
    assert torch.equal(model.log_prob(photos, g2, lengths), lp)
    # one sequence at a time: per-row means of the loss * counts == -log_prob
    for b in range(3):
        n = int(lengths[b])
        o = model.loss(photos[b:b + 1], x[b:b + 1], lengths[b:b + 1])
        assert torch.allclose(-(o["gmm_nll"] * (n - 1) + o["pen_ce"] * n), lp[b], atol=1e-4)


def test_decoder_dropout_regularises_the_vae_loss_only():
    """decoder_dropout acts on the VAE loss in train mode; eval-mode loss, log_prob and sampling (what
    REINFORCE scores) are those of the same model without dropout."""
    rng = np.random.default_rng(5)
    x, lengths = padded_batch(rng, n=3)
    photos = torch.randn(3, 3, 32, 32)
    plain, dropped = small_model(), small_model(decoder_dropout=0.5)
    z = torch.zeros(3, 8)
    plain.train(), dropped.train()
    torch.manual_seed(0)
    assert not torch.allclose(dropped.loss(photos, x, lengths, z=z)["total"], plain.loss(photos, x, lengths, z=z)["total"])
    for m in (plain, dropped):  # log_prob never drops, in train mode too
        m.train()
    assert torch.equal(dropped.log_prob(photos, x[:, 1:], lengths), plain.log_prob(photos, x[:, 1:], lengths))
    plain.eval(), dropped.eval()
    assert torch.equal(dropped.loss(photos, x, lengths)["total"], plain.loss(photos, x, lengths)["total"])
    with pytest.raises(ValueError, match="decoder_dropout"):
        small_config(decoder_dropout=1.0)


def test_offset_scale_makes_loss_unit_free():
    rng = np.random.default_rng(4)
    sk = random_sketches(rng, 4)
    model = small_model().eval()
    photos = torch.randn(4, 3, 32, 32)
    x, lengths = S.pad_stroke5(sk, 20)
    ref = model.loss(photos, torch.as_tensor(x), torch.as_tensor(lengths))
    model.set_offset_scale(3.0 * 10)
    x10, _ = S.pad_stroke5([s * np.array([10, 10, 1], np.float32) for s in sk], 20)
    out = model.loss(photos, torch.as_tensor(x10), torch.as_tensor(lengths))
    assert torch.allclose(out["total"], ref["total"], atol=1e-5)
    assert model.state_dict()["offset_scale"].tolist() == [30.0, 30.0]


def test_kl_weight_annealing_and_floor():
    model = small_model(kl_weight=0.5, kl_weight_start=0.01, kl_anneal_steps=100)
    assert model.kl_weight_at(0) == pytest.approx(0.01)
    assert model.kl_weight_at(50) == pytest.approx(0.01 + 0.49 * 0.5)
    assert model.kl_weight_at(100) == model.kl_weight_at(10**6) == pytest.approx(0.5)
    assert model.kl_weight_at(None) == pytest.approx(0.5)
    vals = [model.kl_weight_at(s) for s in range(0, 120, 7)]
    assert vals == sorted(vals)


def test_config_validation():
    with pytest.raises(ValueError):
        SketchGeneratorConfig(feature_stride=3)
    with pytest.raises(ValueError):
        SketchGeneratorConfig(encoder_channels=(8,), feature_stride=4)
    with pytest.raises(ValueError):
        PhotoToSketchGenerator(small_config(), offset_scale=0.0)


# --------------------------------------------------------------------------
# sampling, log_prob, REINFORCE
# --------------------------------------------------------------------------


def _check_end_format(s5, lengths, max_len):
    assert s5.shape[1] == max_len
    assert ((lengths >= 1) & (lengths <= max_len)).all()
    for b in range(s5.shape[0]):
        n = int(lengths[b])
        assert s5[b, n - 1].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
        assert (s5[b, n:] == torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])).all()
        assert (s5[b, : n - 1, 4] == 0).all()  # no earlier end
        onehot = s5[b, :n, 2:]
        assert torch.equal(onehot.sum(-1), torch.ones(n))


@pytest.mark.parametrize("temperature,pen_temperature", [(1.0, None), (0.4, None), (0.4, 1.0)])
def test_sample_ends_and_log_prob_agrees(temperature, pen_temperature):
    model = small_model(seed=5).eval()
    photos = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        s5, lengths, lp = model.sample(photos, 25, temperature=temperature,
                                       generator=torch.Generator().manual_seed(0), pen_temperature=pen_temperature)
    _check_end_format(s5, lengths, 25)
    assert lengths.min() < 25, "an untrained model should stop somewhere"
    re = model.log_prob(photos, s5, lengths, temperature=temperature, pen_temperature=pen_temperature)
    assert torch.allclose(lp, re, atol=1e-3, rtol=1e-4), (lp, re)
    assert re.requires_grad
    # the sample's own log_prob is differentiable when grad is on
    s5b, lb, lpb = model.sample(photos, 25, temperature=temperature,
                                generator=torch.Generator().manual_seed(0), pen_temperature=pen_temperature)
    assert lpb.requires_grad and torch.equal(s5b, s5) and torch.equal(lb, lengths)
    assert torch.allclose(lpb, lp, atol=1e-5)


def test_pen_temperature_tempers_only_the_pen_logits():
    model = small_model(seed=8).eval()
    out = torch.randn(4, model.head.out_features)
    both = model._split_head(out, 0.4)
    split = model._split_head(out, 0.4, pen_temperature=1.0)
    plain = model._split_head(out, 1.0)
    for key in ("pi_logits", "sigma_x", "sigma_y", "mu_x", "rho"):
        assert torch.equal(both[key], split[key])
    assert torch.equal(split["pen_logits"], plain["pen_logits"])
    assert torch.allclose(both["pen_logits"], plain["pen_logits"] / 0.4)


def test_sample_forced_end_at_max_len_and_reproducible():
    model = small_model(seed=6).eval()
    with torch.no_grad():  # make "end" (almost) impossible, so every sequence hits max_len
        model.head.bias[-1] = -30.0
    photos = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = model.sample(photos, 7, generator=torch.Generator().manual_seed(1))
        b = model.sample(photos, 7, generator=torch.Generator().manual_seed(1))
        c = model.sample(photos, 7, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])
    _check_end_format(a[0], a[1], 7)
    assert (a[1] == 7).all()
    assert torch.allclose(a[2], model.log_prob(photos, a[0], a[1]).detach(), atol=1e-3)
    assert (a[2] < -20).all()  # the forced end is paid for


def test_greedy_sampling_is_deterministic_and_to_stroke3():
    model = small_model(seed=7).eval()
    photos = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.sample(photos, 15, greedy=True)
        b = model.sample(photos, 15, greedy=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0])
    _check_end_format(a[0], a[1], 15)
    s3 = model.to_stroke3(a[0], a[1])
    assert len(s3) == 2
    for i, s in enumerate(s3):
        n = int(a[1][i]) - 1
        assert s.shape == (n, 3) and s.dtype == np.float32
        assert np.allclose(s[:, :2], a[0][i, :n, :2].numpy())
        assert np.array_equal(s[:, 2], a[0][i, :n, 3].numpy())


def test_to_stroke3_round_trips_padded_data():
    rng = np.random.default_rng(8)
    sk = random_sketches(rng, 3)
    x, lengths = S.pad_stroke5(sk, 20)
    model = small_model()
    back = model.to_stroke3(torch.as_tensor(x)[:, 1:], lengths)
    for s, r in zip(sk, back):
        assert np.allclose(s, r)
    assert torch.equal(with_start_token(torch.as_tensor(x)[:, 1:]), torch.as_tensor(x))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_reinforce_step_moves_log_prob_with_advantage(sign):
    base = small_model(seed=10).eval()
    model = copy.deepcopy(base)
    photos = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        s5, lengths, _ = model.sample(photos, 20, generator=torch.Generator().manual_seed(3))
    before = model.log_prob(photos, s5, lengths)
    reward = torch.full((4,), 2.0 * sign) + 0.5  # baseline 0.5 -> advantage = 2*sign
    loss = reinforce_loss(before, reward, baseline=0.5)
    assert torch.allclose(loss, -(2.0 * sign * before).mean())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = model.log_prob(photos, s5, lengths)
    if sign > 0:
        assert after.sum() > before.detach().sum()
    else:
        assert after.sum() < before.detach().sum()


def test_reinforce_loss_detaches_reward():
    lp = torch.randn(5, requires_grad=True)
    r = torch.randn(5, requires_grad=True)
    loss = reinforce_loss(lp, r, baseline=torch.tensor(0.3))
    loss.backward()
    assert r.grad is None
    assert torch.allclose(lp.grad, -(r.detach() - 0.3) / 5)


def test_moving_average_baseline():
    b = MovingAverageBaseline(decay=0.9)
    assert b.value == 0.0
    assert b.update(torch.tensor([1.0, 3.0])) == pytest.approx(2.0)
    assert b.update([0.0, 0.0]) == pytest.approx(1.8)
    assert b.value == pytest.approx(1.8)
    b2 = MovingAverageBaseline()
    b2.load_state_dict(b.state_dict())
    assert b2.value == pytest.approx(1.8) and b2.decay == 0.9
    with pytest.raises(ValueError):
        MovingAverageBaseline(decay=1.0)


# --------------------------------------------------------------------------
# training on real strokes
# --------------------------------------------------------------------------


def _sheep_or_skip(n_max: int, max_points: int) -> list[np.ndarray]:
    if not SHEEP_NPZ.exists():
        msg = f"real data missing: {SHEEP_NPZ} (set SBIR_SHARED_DATA or provide ../shared/data)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    train = np.load(SHEEP_NPZ, encoding="latin1", allow_pickle=True)["train"]
    out = []
    for s in train:
        s3 = S.simplify_stroke3(np.asarray(s, dtype=np.float32), 2.5)
        if 0 < len(s3) <= max_points:
            out.append(s3)
            if len(out) >= n_max:
                break
    assert len(out) >= 50, "too few sheep sketches after simplification"
    return out


def _train_and_check(tmp_path, n_sketches, steps, cfg, min_drop):
    sk = _sheep_or_skip(n_sketches, cfg.max_len - 1)
    t0 = time.perf_counter()
    model, hist = train_on_strokes(sk, steps=steps, config=cfg, batch_size=32, lr=3e-3, seed=0)
    elapsed = time.perf_counter() - t0
    recon = [h["gmm_nll"] + h["pen_ce"] for h in hist]
    first, last = np.mean(recon[:5]), np.mean(recon[-5:])
    assert all(math.isfinite(h["total"]) for h in hist)
    assert last < first - min_drop, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    # render a few samples next to real sketches
    model.eval()
    photos = torch.zeros(8, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        s5, lengths, lp = model.sample(photos, cfg.max_len, temperature=0.5,
                                       generator=torch.Generator().manual_seed(0))
    gen = model.to_stroke3(s5, lengths)
    ink = S.rasterise(sk[:8] + gen, size=64, line_width=1.5)
    assert ink.shape == (16, 64, 64) and np.isfinite(ink).all()
    from PIL import Image

    grid = (255 * (1.0 - ink)).astype(np.uint8).reshape(2, 8, 64, 64)
    grid = grid.transpose(0, 2, 1, 3).reshape(128, 512)
    out_png = tmp_path / "sheep_samples.png"
    Image.fromarray(grid).save(out_png)
    assert out_png.stat().st_size > 0
    return elapsed / steps, first, last


def test_training_on_real_sheep_strokes_reduces_loss_fast(tmp_path):
    cfg = SketchGeneratorConfig(image_size=16, encoder_channels=(8, 16), feature_stride=4,
                                latent_dim=16, decoder_hidden=64, attention_dim=32,
                                num_mixtures=8, max_len=80, kl_anneal_steps=50)
    per_step, first, last = _train_and_check(tmp_path, 300, 60, cfg, min_drop=0.5)
    print(f"fast: {per_step:.3f} s/step, recon {first:.3f} -> {last:.3f}")


@pytest.mark.slow
def test_training_on_real_sheep_strokes_default_sizes(tmp_path):
    cfg = SketchGeneratorConfig(max_len=80)
    per_step, first, last = _train_and_check(tmp_path, 600, 150, cfg, min_drop=0.8)
    print(f"default: {per_step:.3f} s/step, recon {first:.3f} -> {last:.3f}")


def test_photo_dependence_is_zero_for_a_generator_that_ignores_its_photo():
    """photo_dependence: the loss with a swapped photo minus the loss with the own photo. A G whose
    encoder output is zeroed cannot tell photos apart (gain 0); the attention entropy is a share of
    log(H*W) in [0, 1]."""
    from sbir.fgsbir.generator_train import StrokeBank, photo_dependence

    rng = np.random.default_rng(0)
    bank = StrokeBank(random_sketches(rng, 6), 20)
    photos = torch.rand(6, 3, 32, 32)
    model = small_model()
    out = photo_dependence(model, bank, photos, torch.arange(6))
    assert set(out) >= {"photo_loss_gain", "attention_entropy", "photo_loss_own", "photo_loss_shuffled"}
    assert 0.0 <= out["attention_entropy"] <= 1.0 and out["attention_cells"] == 64
    assert out["photo_loss_gain"] == pytest.approx(out["photo_loss_shuffled"] - out["photo_loss_own"], abs=2e-4)
    for m in model.encoder.modules():  # a blind encoder: every photo gives the same features and latent
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
            torch.nn.init.zeros_(m.bias) if m.bias is not None else None
    blind = photo_dependence(model, bank, photos, torch.arange(6))
    assert blind["photo_loss_gain"] == pytest.approx(0.0, abs=1e-5)


def test_photo_teacher_encoder_is_copied_frozen_and_reloaded(tmp_path):
    """encoder_init photo_teacher: G's encoder is the photo teacher's normalisation + first blocks (same
    feature map), a training step changes neither its weights nor its BatchNorm statistics, and
    load_generator rebuilds it from the checkpoint's config."""
    from sbir.config import TeacherParams
    from sbir.fgsbir.generator_train import copy_teacher_encoder, generator_config
    from sbir.fgsbir.params import GeneratorParams
    from sbir.models.checkpoints import TeacherSet, load_generator

    tp = TeacherParams()
    torch.manual_seed(0)
    teachers = TeacherSet(tp, 4).eval()
    p = GeneratorParams(encoder_init="photo_teacher", feature_stride=4, max_len=20, latent_dim=8, decoder_hidden=16,
                        attention_dim=8, num_mixtures=3)
    cfg = generator_config(p, 32, tp.model_dump(mode="json"))
    assert cfg.encoder == "small_cnn" and cfg.encoder_width == tp.backbone.width and cfg.freeze_encoder
    g = PhotoToSketchGenerator(cfg, offset_scale=3.0)
    copy_teacher_encoder(g, teachers)
    photos = torch.rand(4, 3, 32, 32)
    t = teachers.photo_teacher
    with torch.no_grad():
        want = t.backbone.features[:9](t.normalise(photos))  # 3 blocks: stride 4, an 8x8 map
        feats, _, _ = g.encode(photos)
    assert feats.shape == (4, 64, want.shape[1] + 2)
    assert torch.allclose(feats[..., :-2], want.flatten(2).transpose(1, 2), atol=1e-5)
    before = {k: v.clone() for k, v in g.encoder.state_dict().items()}
    g.train()
    opt = torch.optim.Adam([w for w in g.parameters() if w.requires_grad], lr=1e-2)
    x, lengths = padded_batch(np.random.default_rng(0), n=4, max_len=20)
    g.loss(photos, x, lengths)["total"].backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in g.encoder.state_dict().items())
    torch.save({"model": g.state_dict(), "config": cfg.to_dict()}, tmp_path / "g.pt")
    g2, _ = load_generator(tmp_path / "g.pt")
    with torch.no_grad():
        assert torch.allclose(g2.encode(photos)[0], g.eval().encode(photos)[0], atol=1e-6)


def test_photo_teacher_encoder_needs_a_small_cnn_teacher_deep_enough():
    from sbir.fgsbir.generator_train import generator_config
    from sbir.fgsbir.params import GeneratorParams

    p = GeneratorParams(encoder_init="photo_teacher", feature_stride=16)
    with pytest.raises(ValueError, match="needs 5 blocks"):
        generator_config(p, 32, {"backbone": {"name": "small_cnn", "width": 32, "depth": 4}})
    with pytest.raises(ValueError, match="small_cnn or efficientnet_lite0 photo teacher"):
        generator_config(p, 32, {"backbone": {"name": "resnet18"}})


@pytest.mark.parametrize("init", ["photo_teacher", "imagenet"])
def test_efficientnet_encoder_from_the_photo_teacher_or_imagenet(init, tmp_path):
    """An efficientnet_lite0 photo teacher, or the packaged ImageNet weights (no teacher), give G the net's
    stem and stages up to feature_stride: the same feature map as the source net's layers, frozen, and
    rebuilt by load_generator."""
    from sbir.config import BackboneParams, TeacherParams
    from sbir.fgsbir.generator_train import copy_imagenet_encoder, copy_teacher_encoder, generator_config
    from sbir.fgsbir.params import GeneratorParams
    from sbir.models.checkpoints import TeacherSet, load_generator
    from sbir.models.pretrained import efficientnet_lite0, packaged_weights_file

    tp = TeacherParams(backbone=BackboneParams(name="efficientnet_lite0", pretrained=True), image_size=64)
    p = GeneratorParams(encoder_init=init, feature_stride=8, max_len=20, latent_dim=8, decoder_hidden=16,
                        attention_dim=8, num_mixtures=3)
    cfg = generator_config(p, 64, tp.model_dump(mode="json"))
    assert cfg.encoder == "efficientnet_lite0" and cfg.freeze_encoder
    g = PhotoToSketchGenerator(cfg, offset_scale=3.0)
    if init == "photo_teacher":
        torch.manual_seed(0)
        teachers = TeacherSet(tp, 4).eval()
        with torch.no_grad():  # a fine-tuned teacher differs from ImageNet's weights
            teachers.photo_teacher.backbone.net.conv_stem.weight.mul_(1.5)
        copy_teacher_encoder(g, teachers)
        net = teachers.photo_teacher.backbone.net
    else:
        copy_imagenet_encoder(g)
        net = efficientnet_lite0(0, packaged_weights_file()).eval()
    photos = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = net.blocks[:3](net.bn1(net.conv_stem((photos - 0.5) / 0.5)))  # stride 8: 8x8 x 40
        feats, _, _ = g.encode(photos)
    assert feats.shape == (2, 64, 40 + 2)
    assert torch.allclose(feats[..., :-2], want.flatten(2).transpose(1, 2), atol=1e-5)
    assert not any(w.requires_grad for w in g.encoder.parameters())
    torch.save({"model": g.state_dict(), "config": cfg.to_dict()}, tmp_path / "g.pt")
    g2, _ = load_generator(tmp_path / "g.pt")
    with torch.no_grad():
        assert torch.allclose(g2.encode(photos)[0], g.eval().encode(photos)[0], atol=1e-6)

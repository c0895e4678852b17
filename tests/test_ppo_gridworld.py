"""Tests for ppo_gridworld.py: gae and ppo_loss against hand computations, seeded end-to-end
runs that solve the grid world and CartPole-v1, presets vs flags, and one-line errors for bad flags."""
import json, math, os

import pytest
import torch

import common
import ppo_gridworld


def test_gae_truncated_bootstraps_terminated_does_not():
    # 3 steps (rows) x 2 envs (columns); gamma = 0.9, lambda = 0.5, so gamma * lambda = 0.45.
    # env 0: terminated at t=1 (no bootstrap: its next_value 99 must be ignored), new episode at t=2.
    # env 1: truncated at t=0; the true final obs has V = 3.0 (the reset obs, values[1], has 2.0).
    rewards = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0], [0.4, 2.0], [0.3, 0.5]])
    next_values = torch.tensor([[0.4, 3.0], [99.0, 0.5], [0.2, 1.0]])
    terminated = torch.tensor([[False, False], [True, False], [False, False]])
    truncated = torch.tensor([[False, True], [False, False], [False, False]])
    # env 0: delta = [1 + .9*.4 - .5, 1 - .4, 1 + .9*.2 - .3] = [0.86, 0.6, 0.88]
    #        A2 = 0.88;  A1 = 0.6 (episode ended: no A2 term);  A0 = 0.86 + 0.45 * 0.6 = 1.13
    # env 1: delta = [0 + .9*3 - 1, 2 + .9*.5 - 2, 0 + .9*1 - .5] = [1.7, 0.45, 0.4]
    #        A2 = 0.4;  A1 = 0.45 + 0.45 * 0.4 = 0.63;  A0 = 1.7 (bootstrapped, recursion stopped)
    want = torch.tensor([[1.13, 1.7], [0.6, 0.63], [0.88, 0.4]])
    adv = ppo_gridworld.gae(rewards, values, next_values, terminated, truncated, gamma=0.9, lam=0.5)
    assert torch.allclose(adv, want, atol=1e-6)
    # treating the truncation as a termination (CleanRL's shortcut) would give A0 = 0 - 1.0 = -1.0
    wrong = ppo_gridworld.gae(rewards, values, next_values, terminated | truncated, truncated, 0.9, 0.5)
    assert wrong[0, 1].item() == pytest.approx(-1.0)


def test_gae_lambda_one_is_discounted_return_minus_value():
    # lambda = 1, one env, no episode end: A_t = sum_k gamma^k r_{t+k} + gamma^(T-t) V_last - V_t
    r, v = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.5], [0.25]])
    nv = torch.tensor([[0.25], [4.0]])
    no = torch.zeros(2, 1, dtype=torch.bool)
    adv = ppo_gridworld.gae(r, v, nv, no, no, gamma=0.5, lam=1.0)
    # A1 = 2 + .5*4 - .25 = 3.75;  A0 = 1 + .5*2 + .25*4 - .5 = 2.5
    assert torch.allclose(adv, torch.tensor([[2.5], [3.75]]))


def loss_inputs():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.7])
    return dict(new_logp=ratio.log().requires_grad_(), old_logp=torch.zeros(4),
                adv=torch.tensor([1.0, 1.0, -1.0, -1.0]),
                new_values=torch.tensor([0.5, -0.1, 1.3, 1.1]), old_values=torch.tensor([0.0, 0.0, 1.0, 1.0]),
                returns=torch.tensor([1.0, -1.0, 1.0, 3.0]), entropy=torch.tensor([0.6, 0.7, 0.5, 0.2]))


def test_ppo_loss_hand_computed():
    x = loss_inputs()
    loss, s = ppo_gridworld.ppo_loss(**x, clip_coef=0.2, vf_clip=0.2, vf_coef=0.5, ent_coef=0.01, norm_adv=False)
    # ratios r = [1.5, 0.5, 1.1, 0.7], A = [1, 1, -1, -1], eps = 0.2:
    #   min(rA, clip(r)A) = [min(1.5, 1.2), min(0.5, 0.8), min(-1.1, -1.1), min(-0.7, -0.8)]
    #                     = [1.2 (clipped), 0.5, -1.1, -0.8 (clipped)]; mean = -0.05 -> pg_loss = 0.05
    assert s["pg_loss"] == pytest.approx(0.05)
    assert s["clipfrac"] == pytest.approx(0.75)       # |r - 1| > 0.2 for entries 0, 1, 3
    # value: unclipped (V - R)^2 = [0.25, 0.81, 0.09, 3.61]; V_old + clamp(V - V_old, +-0.2) =
    # [0.2, -0.1, 1.2, 1.1] -> [0.64, 0.81, 0.04, 3.61]; max = [0.64, 0.81, 0.09, 3.61]
    # v_loss = 0.5 * mean = 0.5 * 5.15 / 4 = 0.64375
    assert s["v_loss"] == pytest.approx(0.64375)
    assert s["entropy"] == pytest.approx(0.5)
    # k3: mean((r - 1) - log r)
    kl = sum((r - 1) - math.log(r) for r in [1.5, 0.5, 1.1, 0.7]) / 4
    assert s["approx_kl"] == pytest.approx(kl, rel=1e-5) and kl == pytest.approx(0.0872617, rel=1e-5)
    # total = 0.05 + 0.5 * 0.64375 - 0.01 * 0.5
    assert loss.item() == pytest.approx(0.366875)
    # clipped entries carry no gradient; d/dlogp of -r*A/B = -r*A/4 on the others
    loss.backward()
    assert torch.allclose(x["new_logp"].grad, torch.tensor([0.0, -0.125, 0.275, 0.0]), atol=1e-6)


def test_ppo_loss_without_value_clip_and_adv_normalisation():
    x = loss_inputs()
    _, s = ppo_gridworld.ppo_loss(**x, vf_clip=None, norm_adv=False)
    assert s["v_loss"] == pytest.approx(0.5 * (0.25 + 0.81 + 0.09 + 3.61) / 4)  # 0.595
    # per-minibatch normalisation: the loss ignores the advantages' scale and offset
    a, _ = ppo_gridworld.ppo_loss(**x, norm_adv=True)
    y = dict(x, adv=3 * x["adv"] + 2)
    b, _ = ppo_gridworld.ppo_loss(**y, norm_adv=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_solves_gridworld(tmp_path):
    # The default run (30k env steps, seed 1). Best possible return: 8 moves = 7 * -0.01 + 1 = 0.93;
    # timing out scores -0.4 and a pit -1, so >= 0.9 means every greedy episode reaches the goal
    # in at most 10 moves. Seeds 1-8 all reach 0.93 with these defaults.
    out = str(tmp_path / "run")
    summary = ppo_gridworld.main(["--seed", "1", "--out", out])
    assert summary["eval_return_mean"] >= 0.9
    with open(os.path.join(out, "summary.json")) as f:
        saved = json.load(f)
    for key in ["eval_return_mean", "eval_episodes", "env_steps", "wall_s"]:
        assert key in saved
    assert saved["eval_episodes"] >= 20 and saved["env_steps"] >= 29_000
    assert os.path.exists(os.path.join(out, "learning_curve.png"))
    recs = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert {"episodic_return", "approx_kl", "clipfrac", "entropy", "explained_var", "sps"} <= set(recs[-1])


def test_solves_cartpole(tmp_path):
    # The default CartPole-v1 run (PRESETS: 60k env steps, seed 0). Under this suite's AVX2 numerics
    # pins seeds 0-9 all gave greedy 500 over 20 episodes; the slowest (seed 7) first held 500 at
    # ~48k steps. 475 is the usual "solved" line; ~12 s on one core.
    summary = ppo_gridworld.main(["--env", "CartPole-v1", "--seed", "0", "--out", str(tmp_path / "run")])
    assert summary["eval_return_mean"] >= 475 and summary["env_steps"] <= 100_000


def test_presets_fill_only_the_flags_not_given():
    cart, grid = ppo_gridworld.parse_args(["--env", "CartPole-v1"]), ppo_gridworld.parse_args([])
    assert (cart.vf_clip, cart.anneal_clip, cart.update_epochs, cart.total_steps) == (0.0, True, 20, 60_000)
    assert (grid.vf_clip, grid.anneal_clip) == (0.2, False)
    mine = ppo_gridworld.parse_args(["--env", "CartPole-v1", "--vf-clip", "0.3", "--no-anneal-clip"])
    assert (mine.vf_clip, mine.anneal_clip, mine.update_epochs) == (0.3, False, 20)


@pytest.mark.parametrize("argv, flag", [(["--lr", "-1"], "--lr"), (["--num-envs", "0"], "--num-envs"),
                                        (["--env", "NoSuchEnv-v0"], "--env"), (["--gamma", "1.5"], "--gamma")])
def test_bad_flags(argv, flag, tmp_path):
    with pytest.raises(common.InputError, match=flag):
        ppo_gridworld.main(argv + ["--out", str(tmp_path)])

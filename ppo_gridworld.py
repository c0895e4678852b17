"""ppo_gridworld.py: Proximal Policy Optimization on a tiny grid world (and CartPole), from scratch.

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347) is a policy-gradient
method: collect a batch of experience with the current policy pi_old, then take several epochs of minibatch
gradient steps on a *clipped surrogate objective*

    L^CLIP(theta) = E_t[ min( r_t(theta) A_t, clip(r_t(theta), 1 - eps, 1 + eps) A_t ) ],
    r_t(theta) = pi_theta(a_t | s_t) / pi_old(a_t | s_t)                        (paper eq. 7)

which removes the incentive to move the ratio r_t outside [1 - eps, 1 + eps], so reusing the same batch many
times cannot push the policy too far. A value head V(s) is trained next to the policy and the advantages A_t
come from Generalized Advantage Estimation (GAE, Schulman et al. 2016, "High-Dimensional Continuous Control
Using Generalized Advantage Estimation"). This is the same loss that RLHF-style PPO applies to language models
(one token = one action; ppo_lm.py); here it is small enough to watch every number.

Run:
    python ppo_gridworld.py                       # 5x5 grid world, 30k steps, ~10 s on a CPU
    python ppo_gridworld.py --env CartPole-v1     # 60k steps, ~12 s on a CPU core; greedy eval 500 on seeds 0-4
    python ppo_gridworld.py --env Acrobot-v1      # any discrete-action gymnasium id (CleanRL defaults)
Outputs in --out (default out/ppo_gridworld): metrics.jsonl, learning_curve.png, health.png, summary.json
(greedy evaluation return over --eval-episodes episodes, env steps, wall time).

Follows CleanRL's ppo.py (orthogonal init, separate actor/critic MLPs, Adam eps 1e-5, linear lr annealing,
per-minibatch advantage normalisation, clipped value loss, grad-norm clipping), except that episode ends are
exact: `terminated` stops bootstrapping, `truncated` (time limit) bootstraps from V(true final observation);
CleanRL treats both as terminal. Simplified: no target-KL early stopping, observation/reward normalisation,
recurrent policies, continuous actions or Atari/MuJoCo settings; per-env settings: PRESETS.
"""
import argparse, time

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

import common as C

# ----------------------------------------------------------------------------- environments

class GridWorld(gym.Env):
    """5x5 grid: start S, goal G (+1, terminates), pits X (-1, terminates), walls #, -0.01 per other step,
    truncated after max_steps (so time-limit truncations really occur). Observation: the cell index
    (Discrete(25)), which the agent one-hot encodes. Actions: 0 up, 1 right, 2 down, 3 left; bumping a wall or
    the edge = stay. The best path takes 8 moves: return 7 * (-0.01) + 1 = 0.93; wandering until the time limit
    scores -0.4, a pit -1."""
    MAP = ["S..#.",
           ".#...",
           ".#X#.",
           "...X.",
           "X#..G"]
    MOVES = [(-1, 0), (0, 1), (1, 0), (0, -1)]

    def __init__(self, max_steps=40):
        self.n, self.max_steps = len(self.MAP), max_steps
        self.observation_space = gym.spaces.Discrete(self.n * self.n)
        self.action_space = gym.spaces.Discrete(4)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = (0, 0), 0
        return 0, {}

    def step(self, action):
        r, c = self.pos[0] + self.MOVES[action][0], self.pos[1] + self.MOVES[action][1]
        if 0 <= r < self.n and 0 <= c < self.n and self.MAP[r][c] != "#":
            self.pos = (r, c)
        self.t += 1
        cell = self.MAP[self.pos[0]][self.pos[1]]
        reward = {"G": 1.0, "X": -1.0}.get(cell, -0.01)
        terminated = cell in "GX"
        truncated = self.t >= self.max_steps and not terminated  # time limit: the state is not terminal
        return self.pos[0] * self.n + self.pos[1], reward, terminated, truncated, {}


def make_env(env_id):
    if env_id == "gridworld":
        return GridWorld()
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:
        raise C.InputError(f"--env {env_id!r}: {e}") from None
    C.check(isinstance(env.action_space, gym.spaces.Discrete),
            f"--env {env_id!r}: needs discrete actions, has {env.action_space}")
    C.check(isinstance(env.observation_space, (gym.spaces.Box, gym.spaces.Discrete)),
            f"--env {env_id!r}: observations must be Box or Discrete, got {env.observation_space}")
    return env


def encode(obs, space, device):
    """Numpy observations (N, ...) -> float tensor (N, obs_dim); Discrete(n) becomes one-hot (N, n)."""
    if isinstance(space, gym.spaces.Discrete):
        idx = torch.as_tensor(np.asarray(obs, dtype=np.int64) - space.start)
        return torch.nn.functional.one_hot(idx, space.n).float().to(device)
    return torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device).reshape(len(obs), -1)


# ----------------------------------------------------------------------------- model

def layer(n_in, n_out, std=np.sqrt(2)):
    """Orthogonal init (CleanRL / 'implementation matters'): keeps activations well scaled."""
    lin = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(lin.weight, std); nn.init.zeros_(lin.bias)
    return lin


class Agent(nn.Module):
    """Separate actor and critic MLPs (tanh). Actor head std 0.01 -> near-uniform initial policy."""

    def __init__(self, n_obs, n_act, hidden=64):
        super().__init__()
        mlp = lambda n_out, std: nn.Sequential(layer(n_obs, hidden), nn.Tanh(), layer(hidden, hidden), nn.Tanh(),
                                               layer(hidden, n_out, std))
        self.actor, self.critic = mlp(n_act, 0.01), mlp(1, 1.0)

    def forward(self, x):
        """x (B, obs_dim) -> action distribution over (B,) and value (B,)."""
        dist = torch.distributions.Categorical(logits=self.actor(x), validate_args=False)  # skip per-call checks
        return dist, self.critic(x).squeeze(-1)

# ----------------------------------------------------------------------------- losses

def gae(rewards, values, next_values, terminated, truncated, gamma, lam):
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16), with exact episode ends.
    All inputs are (T, N): T steps of N parallel envs, time-major. next_values[t] = V(s_{t+1}), the value of
    the state the step actually led to; for a truncated step that is the true final observation (not the reset
    one). Returns advantages (T, N); value targets are adv + values.
        delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},   done = terminated | truncated
    A terminal state is worth 0, so no bootstrap; a time limit is not a property of the state, so we bootstrap
    from V(s_{t+1}) but still stop the recursion (the next step is a new episode)."""
    not_term = 1.0 - terminated.float()
    not_done = 1.0 - (terminated.bool() | truncated.bool()).float()
    delta = rewards + gamma * not_term * next_values - values
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        last = delta[t] + gamma * lam * not_done[t] * last
        adv[t] = last
    return adv


def ppo_loss(new_logp, old_logp, adv, new_values, old_values, returns, entropy,
             clip_coef=0.2, vf_clip=0.2, vf_coef=0.5, ent_coef=0.01, norm_adv=True):
    """PPO loss to *minimise* (paper eq. 9 negated): -L^CLIP + vf_coef * L^VF - ent_coef * H.
    All inputs (B,) for a minibatch of B transitions: log pi_theta(a|s), log pi_old(a|s), GAE advantages,
    V_theta(s), V_old(s) (from the rollout), value targets R = A + V_old, policy entropy. vf_clip=None turns
    value clipping off. Returns (loss scalar, dict of floats)."""
    if norm_adv:  # per-minibatch normalisation: the step size no longer depends on reward scale
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()                                          # r_t(theta) (defined with eq. 6)
    # eq. 7: min(r A, clip(r, 1-eps, 1+eps) A); as a loss: max of the negated terms
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    v_loss = (new_values - returns) ** 2                             # L^VF = (V(s) - R)^2
    if vf_clip is not None:  # CleanRL/baselines: also keep V within vf_clip of V_old, take the worse
        v_clipped = old_values + (new_values - old_values).clamp(-vf_clip, vf_clip)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    v_loss = 0.5 * v_loss.mean()
    ent = entropy.mean()
    loss = pg_loss + vf_coef * v_loss - ent_coef * ent
    with torch.no_grad():  # health metrics: k3 KL estimator E[(r - 1) - log r] >= 0 (Schulman's blog)
        stats = dict(pg_loss=pg_loss.item(), v_loss=v_loss.item(), entropy=ent.item(),
                     approx_kl=((ratio - 1) - log_ratio).mean().item(),
                     clipfrac=((ratio - 1).abs() > clip_coef).float().mean().item())
    return loss, stats

# ----------------------------------------------------------------------------- config

# Per-env defaults; any flag given on the command line wins. "default" = CleanRL ppo.py. gridworld: ent_coef 0.05
# (with 0.01 one seed in 8 settled for dodging pits until the time limit). CartPole-v1: rl-baselines3-zoo's
# settings (8 envs x 32 steps, one 256-row minibatch, 20 epochs, lr 1e-3 and clip 0.2 both annealed to 0, gamma
# 0.98, lambda 0.8, no entropy bonus, no value clipping as in SB3) on 60k env steps instead of the zoo's 100k.
# Value clipping at 0.2 held the critic back (returns reach ~500) and without clip annealing a policy at 500
# could collapse; seeds and times: README "Results".
PRESETS = {
    "default":     dict(total_steps=500_000, num_envs=4, num_steps=128, lr=2.5e-4, gamma=0.99, gae_lambda=0.95,
                        num_minibatches=4, update_epochs=4, ent_coef=0.01, vf_clip=0.2, anneal_clip=False),
    "gridworld":   dict(total_steps=30_000, num_envs=8, num_steps=64, lr=2.5e-3, gamma=0.99, gae_lambda=0.95,
                        num_minibatches=4, update_epochs=4, ent_coef=0.05, vf_clip=0.2, anneal_clip=False),
    "CartPole-v1": dict(total_steps=60_000, num_envs=8, num_steps=32, lr=1e-3, gamma=0.98, gae_lambda=0.8,
                        num_minibatches=1, update_epochs=20, ent_coef=0.0, vf_clip=0.0, anneal_clip=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PPO from scratch on a grid world or any discrete-action gymnasium env",
                                epilog="flags without a default take it from PRESETS: "
                                + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--env", default="gridworld", help="'gridworld' (built in) or a discrete-action gymnasium id")
    p.add_argument("--seed", type=int, default=1, help="seed for torch, numpy and the environments")
    p.add_argument("--out", default="out/ppo_gridworld", help="output folder (metrics.jsonl, plots, summary.json)")
    p.add_argument("--device", default="cpu", help="torch device; tiny MLPs are fastest on cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny MLPs)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
    p.add_argument("--total-steps", type=int, help="total env steps (all envs); default from PRESETS")
    p.add_argument("--num-envs", type=int, help="parallel envs in the gymnasium.vector.SyncVectorEnv")
    p.add_argument("--num-steps", type=int, help="rollout length per env per iteration (batch = num_envs * num_steps)")
    p.add_argument("--lr", type=float, help="Adam learning rate (annealed linearly to 0 unless --no-anneal-lr)")
    p.add_argument("--anneal-lr", action=argparse.BooleanOptionalAction, default=True, help="linear lr decay to 0")
    p.add_argument("--gamma", type=float, help="discount factor")
    p.add_argument("--gae-lambda", type=float, help="GAE lambda (0 = one-step TD, 1 = Monte Carlo)")
    p.add_argument("--num-minibatches", type=int, help="minibatches per epoch")
    p.add_argument("--update-epochs", type=int, help="passes over each batch")
    p.add_argument("--clip-coef", type=float, default=0.2, help="PPO ratio clip epsilon")
    p.add_argument("--anneal-clip", action=argparse.BooleanOptionalAction, help="linear decay of the clip epsilon "
                   "to 0, like the lr (rl-baselines3-zoo); default from PRESETS")
    p.add_argument("--vf-clip", type=float, help="value clipping range around V_old; 0 turns value clipping off")
    p.add_argument("--ent-coef", type=float, help="entropy bonus coefficient")
    p.add_argument("--vf-coef", type=float, default=0.5, help="value loss coefficient")
    p.add_argument("--max-grad-norm", type=float, default=0.5, help="global gradient-norm clip")
    p.add_argument("--norm-adv", action=argparse.BooleanOptionalAction, default=True, help="normalise advantages")
    p.add_argument("--hidden", type=int, default=64, help="MLP hidden width")
    p.add_argument("--eval-episodes", type=int, default=20, help="greedy evaluation episodes at the end")
    p.add_argument("--log-every", type=int, default=0, help="log every N iterations (0 = about 25 lines per run)")
    args = p.parse_args(argv)
    for k, v in PRESETS.get(args.env, PRESETS["default"]).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    C.check_flags(args, {"> 0": "lr clip_coef max_grad_norm", ">= 1": "num_envs num_steps update_epochs hidden "
                         "threads eval_episodes", ">= 0": "vf_clip ent_coef vf_coef log_every", "in (0, 1]": "gamma",
                         "in [0, 1]": "gae_lambda"})
    batch = args.num_envs * args.num_steps
    C.check(1 <= args.num_minibatches <= batch,
            f"--num-minibatches must be in [1, num_envs * num_steps], got {args.num_minibatches}")
    C.check(args.total_steps >= batch,
            f"--total-steps must be >= num_envs * num_steps = {batch}, got {args.total_steps}")
    return args

# ----------------------------------------------------------------------------- train

def main(argv=None) -> dict:
    args = parse_args(argv)
    # --out and --device checked, seeded; threads: batch <= 1k rows, thread start-up costs more than it saves
    device = C.setup(args.seed, args.device, out=args.out, threads=args.threads).device
    make_env(args.env).close()  # fail fast (one line) on a bad id before building N copies
    # Autoreset SAME_STEP (gymnasium 1.x defaults to NEXT_STEP, whose step after a done is a fake transition): a
    # done step already returns the next episode's first obs, the true last one is in infos["final_obs"][i], and
    # every transition is real (checked against gymnasium 1.4).
    envs = gym.vector.SyncVectorEnv([lambda: make_env(args.env) for _ in range(args.num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    space = envs.single_observation_space
    n_obs = space.n if isinstance(space, gym.spaces.Discrete) else int(np.prod(space.shape))  # encode()'s width
    agent = Agent(n_obs, int(envs.single_action_space.n), args.hidden).to(device)
    opt = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5, foreach=True)  # foreach: fewer kernel calls
    logger = C.Logger(args.out, config=vars(args), wandb=args.wandb)

    N, T = args.num_envs, args.num_steps
    batch, iters = N * T, args.total_steps // (N * T)
    minibatch, log_every = batch // args.num_minibatches, args.log_every or max(1, iters // 25)
    obs_buf = torch.zeros((T, N, n_obs), device=device)  # rollout buffers, time-major (T, N, ...)
    act_buf, logp_buf, val_buf, rew_buf = (torch.zeros((T, N), device=device) for _ in range(4))
    term_buf, trunc_buf = (torch.zeros((T, N), dtype=torch.bool, device=device) for _ in range(2))
    final_val = torch.zeros((T, N), device=device)  # V(true final obs) where truncated, else 0

    next_obs = encode(envs.reset(seed=[args.seed + i for i in range(N)])[0], space, device)
    ep_ret, step, t0 = np.zeros(N), 0, time.time()  # ep_ret: the return so far of each env's episode
    episodes, curve, n_logged = [], ([], []), 0  # finished (step, return); logged (step, mean return)
    for it in tqdm(range(iters), desc=f"ppo {args.env}"):  # 0-based iterations
        if args.anneal_lr:  # linear decay towards 0 over the iterations (CleanRL)
            opt.param_groups[0]["lr"] = args.lr * (1 - it / iters)
        clip = args.clip_coef * (1 - it / iters) if args.anneal_clip else args.clip_coef  # zoo: "lin_0.2"
        # -- rollout: T steps of N envs with the current (old) policy, then the advantages (no graph for either)
        with torch.no_grad():
            for t in range(T):
                obs_buf[t] = next_obs
                dist, value = agent(next_obs)
                action = dist.sample()
                act_buf[t], logp_buf[t], val_buf[t] = action, dist.log_prob(action), value
                obs, reward, term, trunc, info = envs.step(action.cpu().numpy())
                step += N
                next_obs = encode(obs, space, device)
                rew_buf[t] = torch.as_tensor(reward, dtype=torch.float32, device=device)
                term_buf[t], trunc_buf[t] = torch.as_tensor(term, device=device), torch.as_tensor(trunc, device=device)
                final_val[t] = 0
                if trunc.any():  # time limit hit: bootstrap from V(true last obs), not V(reset obs)
                    idx = np.nonzero(trunc)[0]
                    final_obs = encode(np.stack(info["final_obs"][idx]), space, device)
                    final_val[t, idx] = agent.critic(final_obs).squeeze(-1)
                ep_ret += reward
                for i in np.nonzero(term | trunc)[0]:
                    episodes.append((step, ep_ret[i])); ep_ret[i] = 0
            # -- advantages: next_values[t] = V(s_{t+1}) = values[t+1], or V(final obs) at an episode end
            next_values = torch.cat([val_buf[1:], agent.critic(next_obs).squeeze(-1)[None]])
            next_values = torch.where(term_buf | trunc_buf, final_val, next_values)
            adv = gae(rew_buf, val_buf, next_values, term_buf, trunc_buf, args.gamma, args.gae_lambda)
            ret = adv + val_buf  # value targets R_t = A_t + V_old(s_t) (the GAE(lambda) return)

        # -- update: several epochs of shuffled minibatches on the flattened (T*N) batch
        b_obs, b_act, b_logp = obs_buf.reshape(batch, -1), act_buf.reshape(-1), logp_buf.reshape(-1)
        b_adv, b_ret, b_val = adv.reshape(-1), ret.reshape(-1), val_buf.reshape(-1)
        stats = []
        for _ in range(args.update_epochs):
            perm = torch.randperm(batch, device=device)
            for start in range(0, batch - minibatch + 1, minibatch):  # a ragged remainder is dropped
                idx = perm[start:start + minibatch]
                dist, value = agent(b_obs[idx])
                loss, s = ppo_loss(dist.log_prob(b_act[idx]), b_logp[idx], b_adv[idx], value, b_val[idx], b_ret[idx],
                                   dist.entropy(), clip, args.vf_clip or None, args.vf_coef, args.ent_coef,
                                   args.norm_adv)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                s["grad_norm"] = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm).item()
                opt.step()
                stats.append(s)

        if (it + 1) % log_every == 0 or it + 1 == iters:
            # mean return of the episodes finished since the last log line (else the last 20)
            recent = [r for _, r in episodes[n_logged:]] or [r for _, r in episodes[-20:]] or [float("nan")]
            n_logged = len(episodes)
            curve[0].append(step); curve[1].append(float(np.mean(recent)))
            logger.log(step, episodic_return=float(np.mean(recent)), episodes=len(episodes),
                       # explained variance 1 - Var(R - V)/Var(R): 1 = critic predicts returns, <= 0 = useless
                       explained_var=1 - (b_ret - b_val).var().item() / max(b_ret.var().item(), 1e-8),
                       sps=int(step / (time.time() - t0)), lr=opt.param_groups[0]["lr"],
                       **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]})
    envs.close()
    train_time = time.time() - t0

    # ----------------------------------------------------------------------------- evaluate
    # all episodes side by side: one batched forward per time step instead of one per env
    eval_envs = [make_env(args.env) for _ in range(args.eval_episodes)]
    obs = [e.reset(seed=args.seed + 10_000 + i)[0] for i, e in enumerate(eval_envs)]
    returns, live = np.zeros(args.eval_episodes), np.ones(args.eval_episodes, dtype=bool)
    while live.any():
        with torch.no_grad():
            actions = agent.actor(encode(obs, space, device)).argmax(-1).tolist()  # greedy: most likely action
        for i in np.nonzero(live)[0]:
            obs[i], reward, term, trunc, _ = eval_envs[i].step(actions[i])
            returns[i] += reward; live[i] = not (term or trunc)
    for e in eval_envs:
        e.close()

    C.plot(args.out, {"train episodic return": curve}, "learning_curve.png", "env steps", "episodic return",
           f"PPO on {args.env} (greedy eval {np.mean(returns):.3g})")
    C.plot_metrics(args.out, ["approx_kl", "clipfrac", "entropy", "explained_var"], "health.png",
                   f"PPO health, {args.env}")
    summary = dict(env=args.env, seed=args.seed, env_steps=step, iterations=iters, train_time_s=round(train_time, 2),
                   wall_s=round(time.time() - t0, 2), eval_episodes=args.eval_episodes,
                   eval_return_mean=float(np.mean(returns)), eval_return_std=float(np.std(returns)),
                   final_train_return=curve[1][-1] if curve[1] and np.isfinite(curve[1][-1]) else None,
                   episodes=len(episodes))
    C.write_summary(args.out, summary)
    C.cleanup()  # puts torch's threads back
    return summary


if __name__ == "__main__":
    with C.friendly_errors():
        main()

"""A policy's return: teacher and student graphs rolled out in a gymnasium classic-control environment.

Agreement with the teacher on logged observations says how often the student acts as the teacher
did on *those* states; the return says whether it still does the job once its own actions choose the
states it sees. Every model runs the same episodes (seeds ``0 … episodes − 1``), on the ONNX graph
the job delivers, in onnxruntime on CPU — what a team would deploy. gymnasium is optional: without it
the report says the return was not measured, and nothing else changes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

MAX_STEPS = 1000
"""An episode's step cap (the environments' own limits are lower: CartPole-v1 500, Acrobot 500, Pendulum 200)."""


def gymnasium_available() -> bool:
    return importlib.util.find_spec("gymnasium") is not None


def rollout_returns(env_id: str, graphs: Mapping[str, Path], *, episodes: int, discrete: bool,
                    threads: int = 1) -> dict[str, Any]:
    """``{"env", "episodes", "seeds", "returns": {name: {"mean", "std", "min", "max"}}}`` or, without
    gymnasium, ``{"env", "measured": False, "why"}``."""
    if not gymnasium_available():
        return {"env": env_id, "measured": False, "why": "gymnasium is not installed on the worker"}
    import gymnasium as gym
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    returns: dict[str, Any] = {}
    for name, path in graphs.items():
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        env = gym.make(env_id)
        try:
            totals = [_episode(env, session, input_name, seed, discrete) for seed in range(episodes)]
        finally:
            env.close()
        returns[name] = {"mean": float(np.mean(totals)), "std": float(np.std(totals)), "min": float(np.min(totals)),
                         "max": float(np.max(totals))}
    return {"env": env_id, "measured": True, "episodes": episodes, "seeds": list(range(episodes)),
            "returns": returns}


def _episode(env: Any, session: Any, input_name: str, seed: int, discrete: bool) -> float:
    obs, _ = env.reset(seed=seed)
    total = 0.0
    for _ in range(MAX_STEPS):
        out = session.run(None, {input_name: np.asarray(obs, dtype=np.float32).reshape(1, -1)})[0][0]
        if discrete:
            action: Any = int(np.argmax(out))
        else:
            space = env.action_space
            action = np.clip(np.asarray(out, dtype=np.float32).reshape(space.shape), space.low, space.high)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        if terminated or truncated:
            break
    return total


RETURN_TOLERANCE = 0.05
"""A delivered policy whose mean return falls more than 5 % of the teacher's magnitude below it gets a caution."""


def return_reason(section: Mapping[str, Any], delivered: str) -> dict[str, Any] | None:
    """The verdict's ``return_drop`` reason when the delivered graph's mean return is clearly below the
    teacher's (None when it is not, or the return was not measured)."""
    returns = section.get("returns") or {}
    mine, teacher = returns.get(delivered), returns.get("teacher")
    if not section.get("measured") or mine is None or teacher is None:
        return None
    gap = teacher["mean"] - mine["mean"]
    if gap <= RETURN_TOLERANCE * max(abs(teacher["mean"]), 1e-9):
        return None
    return {"code": "return_drop", "severity": "ship_with_caution",
            "message": f"its mean return in {section['env']} is {mine['mean']:.4g}, the teacher's {teacher['mean']:.4g} "
                       f"over the same {section['episodes']} episodes"}


def judge_returns(meta: Mapping[str, Any], graphs: Mapping[str, Path], delivered: str, delivery: dict[str, Any], *,
                  threads: int, warnings: list[str]) -> None:  # fmt: skip
    """Roll every graph out in the policy's environment and put the returns in ``delivery["policy"]``;
    a delivered policy that returns clearly less than the teacher is a caution in the verdict."""
    section = rollout_returns(str(meta["env"]), graphs, episodes=int(meta.get("episodes", 10)),
                              discrete=meta.get("action_space") == "discrete", threads=threads)  # fmt: skip
    section["delivered"] = delivered
    delivery["policy"] = section
    if not section.get("measured"):
        warnings.append(f"the return in {meta['env']} was not measured: {section.get('why')}")
        return
    reason = return_reason(section, delivered)
    if reason is not None:
        delivery["reasons"].append(reason)
        if delivery["verdict"] == "ship":
            delivery["verdict"] = "ship_with_caution"

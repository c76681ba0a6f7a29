"""Closed-loop planning (model-predictive control) in a Gymnasium-style environment.

    result = run_closed_loop(env, seed=3, observe=encode_frame, goal=encode_goal, plan=policy, context=4)

Each step: plan from the last `context` observed states (and the actions executed between them) towards the goal
state, execute only the first planned action, observe, and replan, until the environment says the goal is reached
(`terminated`) or the step limit is hit (`truncated`). The environment is duck-typed: `reset(seed)` returns
(obs, info) with `info["distance"]` to the goal, `step(action)` returns (obs, reward, terminated, truncated,
info); when `info["applied_action"]` exists (the manipulation env clips to its workspace) that is the action
recorded as executed. Nothing is written; the caller owns the result.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def run_closed_loop(env: Any, *, seed: int, observe: Callable[[Any, dict], Any], goal: Callable[[dict], Any],
                    plan: Callable[[list, list, Any], np.ndarray], context: int) -> dict:
    """Returns success (goal reached within the limit), final_distance, initial_distance, steps, actions, distances."""
    if context < 1:
        raise ValueError("context must hold at least the current observation")
    obs, info = env.reset(seed=seed)
    goal_state = goal(info)
    states, actions, distances = [observe(obs, info)], [], [float(info["distance"])]
    terminated = truncated = False
    while not (terminated or truncated):
        ctx_states = states[-context:]
        ctx_actions = actions[len(actions) - (len(ctx_states) - 1):] if len(ctx_states) > 1 else []
        action = np.asarray(plan(ctx_states, ctx_actions, goal_state), dtype=np.float64)
        obs, _, terminated, truncated, info = env.step(action)
        actions.append(np.asarray(info.get("applied_action", action), dtype=np.float64))
        states.append(observe(obs, info))
        distances.append(float(info["distance"]))
    return {"success": bool(terminated), "final_distance": distances[-1], "initial_distance": distances[0],
            "steps": len(actions), "actions": np.stack(actions), "distances": np.asarray(distances)}

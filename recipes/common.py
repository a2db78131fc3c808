"""What both recipes do after building their trainer: train, evaluate, save, push, print the result."""

from __future__ import annotations

import json
import os
import time


def final_metrics(trainer) -> dict:
    """The evaluation of the final global adapter: the one logged after the last round, else a fresh one."""
    logged = [log for log in trainer.state.log_history if "eval_accuracy" in log]
    if logged and logged[-1].get("step") == trainer.args.num_rounds:
        return logged[-1]
    return trainer.evaluate()


def train_and_report(trainer, args, start: float, **extra) -> dict:
    """Train, save the adapter folder (adapter, card, privacy report), push if asked, print and return the result."""
    trainer.train()
    metrics = final_metrics(trainer)
    trainer.save_model(args.output_dir)
    report = trainer.privacy_report()
    if args.push_to_hub:
        trainer.push_to_hub()
    result = {"eval_accuracy": metrics.get("eval_accuracy"), "epsilon": report["epsilon"],
              "delta": report.get("delta"), "noise_multiplier": report.get("noise_multiplier"),
              "output_dir": os.path.abspath(args.output_dir), "wall_time_s": round(time.time() - start, 1), **extra}
    if trainer.is_world_process_zero():
        print(json.dumps(result, indent=1))
        print(f"accuracy: {result['eval_accuracy']:.4f}")
        print(f"epsilon: {result['epsilon']:.4f} (delta {result['delta']}, sample-level, per client)")
        print(f"output_dir: {result['output_dir']}")
    return result

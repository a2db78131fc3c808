"""`FederatedDPTrainer`: federated LA-LoRA (or a baseline, by the model's `LALoraConfig.alternation`) under
sample-level DP, on the `transformers.Trainer` machinery: logging, callbacks, progress bar, `evaluate()`,
Accelerate (each process runs a disjoint share of every round's clients; deltas are summed across processes).

Only `train()` is replaced: a round is not an optimizer step of the Trainer's loop (it is many clients' local
DP-SGD steps on Poisson batches, which the Trainer's shuffled fixed-size batches are not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import NamedTuple, Optional

from accelerate.utils import broadcast_object_list, gather_object
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from .arguments import FederatedDPArguments
from .errors import CheckpointMismatchError, ClientDataError, ConfigError, PrivacyBudgetExceededError
from .federated.checkpoint import STATE_DIR, load_checkpoint, save_checkpoint
from .federated.client import ClientShard, model_columns
from .federated.client_dp import round_tensor_names
from .federated.client_update import LocalConfig, client_update, stepper_from_args
from .federated.disclosure import error_text, reveals_private
from .federated.fingerprint import check_fingerprints, shard_fingerprint
from .federated.ledger_check import checked_ledger
from .federated.output_dir import prepare_output_dir
from .federated.partition import partition_fingerprint, partition_indices
from .federated.preflight import preflight
from .federated.round import RoundPolicy, finite_mean
from .federated.seeding import calibration_steps, run_schedule, secret_seed
from .federated.server import GlobalAdapter
from .federated.state_io import compare_settings, save_json
from .hub import push_adapter_folder, write_model_card  # hub imports only tuner, privacy and errors
from .hub.card import FEDERATED_KEYS
from .privacy.accounting import PrivacyLedger, compute_epsilon
from .privacy.plan import PrivacyPlan
from .privacy.prior import REPORT_FILE, apply_prior, partition_record, prior_report_fields
from .privacy.report import (
    PrivacyReport,
    build_report,
    non_private_report,
    run_privacy_fields,
    with_client_level,
)
from .privacy.sampling import sample_rate_for
from .training_arguments import round_learning_rates
from .tuner.export import SCHEDULE_FIELDS
from .tuner.model import LALoraModel
from .tuner.roles import adapter_tensor_names
from .tuner.saving import save_adapter_files

logger = logging.getLogger(__name__)
FAILED_DATA_CHECK = (
    "ClientDataError: the client's data failed the data check before training (see its warning then), so the "
    "client is dropped from every round it is scheduled in"
)


class Federation(NamedTuple):
    """The federation a `FederatedDPTrainer` set up (`trainer.federation`): public facts only, never the secret
    root of the noise and the batches (which has no accessor, by design)."""

    shards: tuple  # each client's `ClientShard` (its collated examples), in client order
    client_sizes: tuple  # each client's number of examples
    client_users: Optional[tuple]  # each client's number of users under user-level DP, else None
    noise_multiplier: float  # sigma of the sample-level DP step (0.0 without DP)
    delta: Optional[float]  # the sample-level delta (None without DP)
    fingerprint: str  # of the split into clients (the resume check)
    partition: dict  # the public record of the split (`privacy.prior.partition_record`)
    prior_steps: Optional[dict]  # each client's earlier steps composed into its ledger (`privacy.prior`), or None


class FederatedDPTrainer(Trainer):
    """
    Args:
        model: `get_peft_model(base, LALoraConfig(...))`, already on its device.
        args (`FederatedDPArguments`): federation, privacy and the usual `TrainingArguments`.
        train_dataset: partitioned into `num_clients` shards (IID or Dirichlet by `args.label_column`), or
        client_datasets (`list[datasets.Dataset]`): one dataset per client (e.g. grouped by a natural key).
        Other arguments are the Trainer's (`eval_dataset`, `compute_metrics`, `data_collator`, `callbacks`, ...).
    """

    def __init__(
        self,
        model=None,
        args: FederatedDPArguments = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        client_datasets=None,
        **kwargs,
    ):
        if not isinstance(args, FederatedDPArguments):
            raise ConfigError(f"`args` must be a FederatedDPArguments, got {type(args).__name__}.")
        if not isinstance(getattr(model, "base_model", None), LALoraModel):
            raise ConfigError(
                "`model` must be `get_peft_model(base, LALoraConfig(...))` (after `import peft_lalora`), "
                f"got {type(model).__name__}."
            )
        if (train_dataset is None) == (client_datasets is None):
            raise ConfigError(
                "Give exactly one of `train_dataset` (partitioned into `num_clients` shards) and "
                "`client_datasets` (one dataset per client)."
            )
        super().__init__(model, args, data_collator, train_dataset, eval_dataset, **kwargs)
        self.client_datasets = client_datasets
        self.adapter_name = model.active_adapter
        self.ledger = None
        self._calibration = None  # how sigma was chosen: "schedule", "worst_case" or "given"
        self._federation = None
        self.local_clients = []  # per round, the clients this process ran
        self._train_called = False
        self._private_seed = None  # root of the noise and the batches: secret, only in the private checkpoint
        self._fingerprints = None  # keyed fingerprints of the clients' data, for the resume check
        self._failed_data_check = frozenset()  # clients dropped from every round by the data check
        self._prior = None  # the earlier spending of the adapter this run starts from (`privacy.prior.PriorUse`)

    # ----- setup -------------------------------------------------------------------------------------------------
    @property
    def tuner(self) -> LALoraModel:
        return self.model.base_model

    @property
    def federation(self) -> Federation:
        """The clients' shards, sizes and the calibrated noise, set up (partition, calibration) on first use."""
        self._setup_federation()
        return self._federation

    def _setup_federation(self) -> None:
        if self._federation is not None:
            return
        args = self.args
        shards, fingerprint = self._client_shards()
        sizes = [len(d) if idx is None else len(idx) for d, idx in shards]
        clients = self._build_shards(shards)
        units = [c.num_units for c in clients]  # examples, or users under user-level DP: what q and delta count
        for k, n in enumerate(units):  # q = B / n_k <= 1 for every client, private or not
            sample_rate_for(args.per_device_train_batch_size, n, client=k, unit=f"{args.privacy_unit}s")
        noise_multiplier, delta = 0.0, None
        partition = partition_record(args, given_per_client=self.client_datasets is not None)
        if args.dp:
            client_sizes = dict(enumerate(units))
            plan = PrivacyPlan.from_args(args, client_sizes, scheduled_steps=calibration_steps(args, client_sizes))
            noise_multiplier, delta, self.ledger = plan.noise_multiplier, plan.delta, plan.new_ledger()
            self._calibration = plan.calibration
            config = self.model.peft_config[self.adapter_name]
            self.ledger, self._prior = apply_prior(args, config, self.ledger, partition, run_schedule(args))
        users = tuple(units) if args.privacy_unit == "user" else None
        prior_steps = self._prior.steps() if self._prior is not None else None
        self._federation = Federation(
            tuple(clients), tuple(sizes), users, noise_multiplier, delta, fingerprint, partition, prior_steps
        )
        self.global_adapter = GlobalAdapter(self.model, adapter_tensor_names(self.model, self.adapter_name))
        self._round_lrs = round_learning_rates(args)
        self._local = LocalConfig.from_args(args)
        self._private_seed = self._draw_private_seed()
        names, config = list(self.global_adapter.state), self.model.peft_config[self.adapter_name]
        self.round_policy = RoundPolicy(
            args,
            private_root=self._private_seed,
            round_tensors=lambda r: round_tensor_names(config, names, self.adapter_name, r, args.local_steps),
        )
        self.stepper = stepper_from_args(self.model, args, noise_multiplier, adapter_name=self.adapter_name)

    def _build_shards(self, shards: list) -> list:
        """A `ClientShard` per (dataset, row indices): each distinct dataset is restricted to the model's columns
        (its user ids read first under user-level DP), and collated, once."""
        columns, user_column = model_columns(self.model), self.args.user_column
        whole, clients = {}, []
        for dataset, idx in shards:
            if id(dataset) not in whole:
                whole[id(dataset)] = ClientShard(
                    dataset, self.data_collator, columns, self.args.device, user_column=user_column
                )
            clients.append(whole[id(dataset)] if idx is None else whole[id(dataset)].subset(idx))
        return clients

    def _draw_private_seed(self):
        """The root of the noise and the Poisson batches: the OS's entropy for a DP run (`noise_seed` fixes it
        for tests and research; no guarantee then), the public seed for the non-private baseline."""
        args = self.args
        if not args.dp and not args.client_dp:
            return args.seed
        if args.noise_seed is not None:
            return args.noise_seed
        secret = [secret_seed()]
        if args.world_size > 1:  # every process runs a share of the clients from the same root
            broadcast_object_list(secret, from_process=0)
        return secret[0]

    def _client_shards(self) -> tuple[list, str]:
        """[(dataset, row indices or None)] per client, and a fingerprint of the split (for resume checks)."""
        args = self.args
        min_size = args.min_shard_size or args.per_device_train_batch_size
        if self.client_datasets is not None:
            if len(self.client_datasets) != args.num_clients:
                raise ConfigError(
                    f"`num_clients` ({args.num_clients}) must equal len(client_datasets) "
                    f"({len(self.client_datasets)})."
                )
            shards = [(d, None) for d in self.client_datasets]
            fingerprint = hashlib.sha256(
                json.dumps([[len(d), getattr(d, "_fingerprint", "")] for d in self.client_datasets]).encode()
            ).hexdigest()
            return shards, fingerprint
        if args.num_clients > len(self.train_dataset):
            raise ConfigError(
                f"`num_clients` must be <= the number of training examples ({len(self.train_dataset)}), "
                f"got {args.num_clients}."
            )
        if min_size * args.num_clients > len(self.train_dataset):
            raise ConfigError(
                f"`per_device_train_batch_size` ({args.per_device_train_batch_size}) is the expected Poisson "
                f"batch of every client, so each of the {args.num_clients} shards needs >= {min_size} "
                f"examples, but the dataset has {len(self.train_dataset)}. Lower the batch size, "
                "`min_shard_size` or `num_clients`."
            )
        indices = partition_indices(
            self.train_dataset,
            args.num_clients,
            dirichlet_alpha=args.dirichlet_alpha,
            seed=args.seed,
            min_shard_size=min_size,
            label_column=args.label_column,
        )
        return [(self.train_dataset, idx) for idx in indices], partition_fingerprint(indices)

    # ----- the loop ----------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run `num_rounds` federated rounds (continuing from a checkpoint if `resume_from_checkpoint` is True or
        a `federated_state` folder). Returns a `TrainOutput` whose `global_step` counts rounds. A trainer trains
        once: a second call would replay the same rounds, noise and batches, which no accountant covers."""
        if self._train_called:
            raise ConfigError(
                "`train()` was already called on this trainer: a second call would re-run rounds "
                "0..num_rounds-1 with the same noise and Poisson batches, releases the accountant "
                "cannot count as independent. Build a new FederatedDPTrainer (and pass "
                "`resume_from_checkpoint=True` to finish an interrupted run)."
            )
        self._train_called = True
        prepare_output_dir(self.args, resuming=bool(resume_from_checkpoint))
        self._setup_federation()
        start = self._resume(resume_from_checkpoint) if resume_from_checkpoint else 0
        if start < self.args.num_rounds:  # every client's data checked once, before anything is charged
            self.global_adapter.load_into_model()
            failed = preflight(
                self.model, self._federation.shards, self.stepper, start, reveal_errors=reveals_private(self.args)
            )
            self._failed_data_check = frozenset(failed)
        args, state = self.args, self.state
        state.max_steps, state.global_step = args.num_rounds, start
        state.is_local_process_zero = self.is_local_process_zero()
        state.is_world_process_zero = self.is_world_process_zero()
        start_time, losses = time.time(), []
        self.control = self.callback_handler.on_train_begin(args, state, self.control)
        for round_idx in range(start, args.num_rounds):
            self.control = self.callback_handler.on_step_begin(args, state, self.control)
            logs = self._run_round(round_idx)
            losses.append(logs.get("loss", float("nan")))
            state.global_step, state.epoch = round_idx + 1, (round_idx + 1) / args.num_rounds
            self.log(logs)
            if args.eval_rounds and (round_idx + 1) % args.eval_rounds == 0 and self.eval_dataset is not None:
                self.evaluate(ignore_keys=ignore_keys_for_eval)
            self._save_round(round_idx)
            self.control = self.callback_handler.on_step_end(args, state, self.control)
            if self.control.should_training_stop:
                break
        if not args.eval_rounds and self.eval_dataset is not None:
            self.evaluate(ignore_keys=ignore_keys_for_eval)
        metrics = {"train_runtime": time.time() - start_time}
        if reveals_private(self.args):  # the noise-free training loss: outside the DP guarantee, only on request
            metrics["train_loss"] = finite_mean(losses)
        if self.ledger is not None:
            metrics["epsilon"] = self.ledger.max_epsilon()
        self.control = self.callback_handler.on_train_end(args, state, self.control)
        return TrainOutput(state.global_step, metrics.get("train_loss", float("nan")), metrics)

    def _run_round(self, round_idx: int) -> dict:
        args, policy = self.args, self.round_policy
        clients = policy.select(round_idx)
        ledger_before = None
        if self.ledger is not None:  # refuse before anything is computed or released; charged whether it survives
            ledger_before = self.ledger.state_dict()
            charged = range(args.num_clients) if args.client_dp else clients  # client-level: the sample is private
            for client in charged:
                self.ledger.check_release(client, args.local_steps)
            for client in charged:
                self.ledger.charge(client, args.local_steps)
        lr = self._round_lrs[round_idx]
        total = policy.aggregator(self.global_adapter.state, round_idx)
        self.model.train()
        mine = clients[args.process_index :: args.world_size]  # this process's disjoint share of the round
        self.local_clients.append(mine)
        records = [self._run_client(round_idx, client, lr, total) for client in mine]
        total.reduce(self.accelerator.reduce if args.world_size > 1 else None)
        records = gather_object(records) if args.world_size > 1 else records
        failed = [r for r in records if "error" in r]
        if failed and len(failed) == len(clients):  # shared by every client: the user's error, not a dropout
            if ledger_before is not None:  # nothing left any client: the round's charge is withdrawn
                self.ledger = PrivacyLedger.from_state_dict(ledger_before)
            self.global_adapter.load_into_model()
            first = min(failed, key=lambda r: r["client"])
            raise ClientDataError(
                f"Every client of round {round_idx} failed, so nothing was released or charged. "
                f"Client {first['client']}: {first['error']}"
            )
        logs = {"round": float(round_idx + 1), "learning_rate": lr}
        if not args.client_dp or reveals_private(self.args):  # under client-level DP the sample's size is secret
            logs.update(clients=float(total.survivors), failed_clients=float(len(failed)))
        for record in failed:
            logger.warning(
                "round %d: client %d failed and was dropped: %s", round_idx, record["client"], record["error"]
            )
        merged = policy.close(total, round_idx, len(clients))
        if merged is None:
            logs["round_aborted"] = 1.0
        else:
            self.global_adapter.state = merged
        self.global_adapter.load_into_model()
        if reveals_private(self.args):
            logs.update(private_round_metrics(records))
        if self.ledger is not None:
            logs["epsilon"] = self.ledger.max_epsilon()
        if args.client_dp:
            logs["client_epsilon"] = policy.client_level.epsilon(round_idx + 1)
        return logs

    def _run_client(self, round_idx: int, client: int, lr: float, total) -> dict:
        """One client's update into `total`; a client that raises is dropped, a budget error is not. A client whose
        data failed the data check is dropped without running (whether its batch would draw the bad example is
        private), as failed."""
        if client in self._failed_data_check:
            return {"client": client, "error": FAILED_DATA_CHECK}
        try:
            update = client_update(
                model=self.model,
                stepper=self.stepper,
                shard=self._federation.shards[client],
                global_state=self.global_adapter.state,
                round_idx=round_idx,
                client=client,
                lr=lr,
                local=self._local,
                private_seed=self._private_seed,
                adapter_name=self.adapter_name,
            )
        except PrivacyBudgetExceededError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing client must not take the federation down
            text = error_text(exc, reveal=reveals_private(self.args), where="inside the client's local round")
            return {"client": client, "error": text, "dropped": getattr(exc, "dropped", 0)}
        total.add(update.delta, self.round_policy.weight(update.num_examples))
        return {"client": client, "loss": update.loss, "examples": update.sampled, "dropped": update.dropped}

    # ----- checkpoints -----------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        config = self.model.peft_config[self.adapter_name]
        adapter = {k: getattr(config, k) for k in ("r", "lora_alpha", *SCHEDULE_FIELDS)}
        adapter["target_modules"] = (
            sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
        )
        fed = self._federation
        return {
            "args": self.args.resume_settings(),
            "adapter": adapter,
            "partition": fed.fingerprint,
            "client_sizes": list(fed.client_sizes),
            **({"client_users": list(fed.client_users)} if fed.client_users is not None else {}),
            "noise_multiplier": fed.noise_multiplier,
            "delta": fed.delta,
        }

    def _save_round(self, round_idx: int) -> None:
        """Checkpoint after every round (resume needs it), unless `save_strategy="no"`."""
        if not self.args.should_save or self.args.save_strategy == "no":
            return
        server_state = {
            "settings": self._settings(),
            "log_history": self.state.log_history,
            "ledger": self.ledger.state_dict() if self.ledger is not None else None,
            "private_seed": self._private_seed,
            "data_fingerprints": self._data_fingerprints(),
        }  # private: this folder must never be published
        save_checkpoint(
            os.path.join(self.args.output_dir, STATE_DIR),
            round_idx=round_idx,
            global_state=self.global_adapter.state,
            server_state=server_state,
        )

    def _resume(self, checkpoint) -> int:
        directory = os.path.join(self.args.output_dir, STATE_DIR) if checkpoint is True else str(checkpoint)
        shapes = {n: tuple(t.shape) for n, t in self.global_adapter.state.items()}
        state, tensors = load_checkpoint(directory, expected_shapes=shapes)
        compare_settings(state["settings"], self._settings())
        held = self.global_adapter.state  # the checkpoint's tensors go where these are, in their dtype
        self.global_adapter.state = {n: t.to(held[n].device, held[n].dtype) for n, t in tensors.items()}
        self.global_adapter.load_into_model()
        if self.args.dp:
            self.ledger = checked_ledger(state, directory, self.args, self._federation)
        if self.args.dp or self.args.client_dp:
            self._private_seed = self.round_policy.private_root = state.get("private_seed")
            if self._private_seed is None or "data_fingerprints" not in state:
                raise CheckpointMismatchError(
                    f"The checkpoint {directory!r} holds no private randomness (`private_seed`) or no fingerprint "
                    "of the clients' data: resuming would have to draw new noise for the rounds already run, or "
                    "could re-use its noise on other data. Start a fresh `output_dir`."
                )
        if self.args.dp:
            self._fingerprints = None  # of this run's data under the checkpoint's root
            check_fingerprints(state["data_fingerprints"], self._data_fingerprints(), directory)
        self.state.log_history = list(state.get("log_history", []))
        logger.info("resumed from %s after round %d", directory, state["round"])
        return int(state["round"]) + 1

    def _data_fingerprints(self):
        """Per client, the keyed fingerprint of its data (`federated.fingerprint`), once per run; None when the
        run is not private (its randomness is public)."""
        if not self.args.dp:
            return None
        if self._fingerprints is None:
            self._fingerprints = [shard_fingerprint(s, self._private_seed) for s in self._federation.shards]
        return self._fingerprints

    # ----- results -------------------------------------------------------------------------------------------
    def privacy_report(self) -> dict:
        """Epsilon per client and the maximum, delta, sigma, C, sample rates, steps, accountant, unit: the JSON
        form (privacy_report.json) of `privacy_record()`."""
        return self.privacy_record().to_dict()

    def privacy_record(self) -> PrivacyReport:
        """The privacy report, typed (`privacy.report.PrivacyReport`)."""
        self._setup_federation()
        client_level = self.round_policy.client_level_report(self.state.global_step)
        if self.ledger is None:
            return build_report(with_client_level(non_private_report(), client_level, self.args))
        report = self.ledger.report()
        worst_case = (max(c["sample_rate"] for c in report["clients"]), self.args.num_rounds * self.args.local_steps)
        report.update(
            run_privacy_fields(self.args),
            sigma_calibration=self._calibration,
            worst_case_epsilon=compute_epsilon(
                noise_multiplier=self.ledger.noise_multiplier,
                sample_rate=worst_case[0],
                steps=worst_case[1],
                delta=self.ledger.delta,
                accountant=self.args.accountant,
            ),
            partition=self._federation.partition,
        )
        if self._federation.client_users is not None:  # user-level DP: each client's count of users (its q's n)
            for entry in report["clients"]:
                entry["users"] = self._federation.client_users[entry["client"]]
        if self._prior is not None:
            report.update(prior_report_fields(self._prior, self.ledger, report, worst_case))
        return build_report(with_client_level(report, client_level, self.args))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the global adapter (peft format, safetensors, at the top of the folder even when the adapter is not
        named "default"), `privacy_report.json`, the training arguments as JSON and the model card. Nothing is
        pickled (the Trainer's own `_save` writes `training_args.bin`)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        if os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir) and os.path.isdir(
            os.path.join(output_dir, STATE_DIR)
        ):
            raise ConfigError(
                f"`output_dir` {output_dir!r} holds another run's checkpoint ({STATE_DIR}/): saving this "
                "adapter, card and privacy report there would mix two runs. Save to a fresh folder."
            )
        self._setup_federation()
        self.global_adapter.load_into_model()
        save_adapter_files(self.model, output_dir, self.adapter_name)  # at the top, whatever the adapter's name
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        save_json(os.path.join(output_dir, REPORT_FILE), self.privacy_report())
        save_json(os.path.join(output_dir, "training_args.json"), self.args.to_dict())
        write_model_card(output_dir, **self.card_context())

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """The Hub repo is created by `push_to_hub`, not when the trainer is built (which may be offline)."""
        self.hub_model_id = self.args.hub_model_id

    def push_to_hub(
        self,
        commit_message: str = "Upload LA-LoRA adapter",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> str | None:
        """Save the aggregated adapter to `output_dir` and upload its artifacts to `args.hub_model_id` in one commit
        (`hub.push_adapter_folder`: which files, retries, `HubError`). Returns the commit URL (None on processes
        other than the main one)."""
        if not self.args.hub_model_id:
            raise ConfigError("`hub_model_id` must name the Hub repo to push to (e.g. 'alice/lalora-sst2'), got None.")
        self.save_model(self.args.output_dir)
        if not self.is_world_process_zero():
            return None
        return push_adapter_folder(
            self.args.output_dir,
            self.args.hub_model_id,
            token=token or self.args.hub_token,
            private=bool(self.args.hub_private_repo),
            commit_message=commit_message,
            allow_fixed_noise_seed=self.args.allow_fixed_noise_seed,
        )

    def card_context(self) -> dict:
        """The model card's inputs: the metrics of the LAST evaluation and its round (an earlier round's are said
        to be so), the adapter's round, `card_dataset_name` as the dataset, no base model when none is recorded."""
        args, config = self.args, self.model.peft_config[self.adapter_name]
        partition = f"Dirichlet(alpha={args.dirichlet_alpha})" if args.dirichlet_alpha else "IID"
        partition = "given per client" if self.client_datasets is not None else partition
        last = next((log for log in reversed(self.state.log_history) if any(k.startswith("eval_") for k in log)), {})
        metrics = {k: v for k, v in last.items() if k.startswith("eval_")}
        return {
            "base_model": config.base_model_name_or_path or None,
            "base_model_path": local_base_path(self.model),
            "adapter_config": config.to_dict(),
            "privacy_report": self.privacy_report() if args.dp or args.client_dp else None,
            "metrics": metrics,
            "eval_round": last.get("step"),
            "adapter_round": self.state.global_step,
            "dataset": args.card_dataset_name,
            "data_format": args.card_data_format,
            "federated": {**{k: getattr(args, k) for k in FEDERATED_KEYS}, "partition": partition},
            "repo_id": args.hub_model_id,
        }


def local_base_path(model) -> str | None:
    """The local folder the base model was loaded from (its config's `_name_or_path`), or None (a Hub id, or a
    model built from a config): the card's loading code names it, so that it runs where the run ran."""
    path = getattr(getattr(model.get_base_model(), "config", None), "_name_or_path", None)
    return os.path.abspath(path) if isinstance(path, str) and path and os.path.isdir(path) else None


def private_round_metrics(records: list) -> dict:
    """The round's metrics computed from private data without noise (`disclosure.PRIVATE_METRICS`): the mean loss of the
    clients with a finite loss, and the counts of sampled and dropped examples."""
    out = {
        "sampled_examples": float(sum(r.get("examples", 0) for r in records)),
        "dropped_examples": float(sum(r.get("dropped", 0) for r in records)),
    }
    loss = finite_mean(r["loss"] for r in records if "loss" in r)
    if not math.isnan(loss):
        out["loss"] = loss
    return out

"""The recipe's ClientApp, in a module of its own: Flower starts a fresh process per message, and this module
imports neither torch nor the task (so neither transformers nor peft) unless the node trains in trial mode. A
node in relay mode forwards the round to its owner's private trainer (`peft_lalora_relay.client_app`)."""

from peft_lalora_relay.client_app import make_client_app

client_app = make_client_app(trial_task="lalora_rt.task:TASK")

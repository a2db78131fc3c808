"""The light side of the data owner's relay: what a process that only forwards bytes to the private trainer needs,
importing neither torch, transformers nor peft (numpy, safetensors and, for the ClientApp, flwr only).

Why a package of its own, next to `peft_lalora` rather than inside it: Flower starts a fresh `flwr-clientapp`
process for every message (Flower issue #3670), and importing any `peft_lalora.x` runs `peft_lalora/__init__.py`,
which must register the `LALORA` tuner with peft (so that `PeftModel.from_pretrained` knows it after a plain
`import peft_lalora`) and so imports torch, transformers and peft: 10 s per message on a loaded 2-core machine,
only to relay a few hundred KB. Importing this package runs nothing of `peft_lalora`, and `peft_lalora` builds on
it (one wire format, one set of codes, one token check), so the imports still flow one way:

    peft_lalora_relay.codes, .token, .wire, .relay   (Flower-free)  <-  peft_lalora.owner  <-  peft_lalora.flower
    peft_lalora_relay.packed, .client_app (flwr: the packed record; relay mode here, trial mode delegates to
        peft_lalora.flower, lazily)

    # an app's ClientApp module (its own module: nothing heavy imported at the top):
    from peft_lalora_relay.client_app import make_client_app
    client_app = make_client_app(trial_task="my_app.task:TASK")   # clientapp = "my_app.client:client_app"
"""

__all__: list = []

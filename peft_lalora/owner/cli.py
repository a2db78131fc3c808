"""`lalora-private-trainer --config owner.toml`: the data owner starts the private trainer (see `config`)."""

from __future__ import annotations

import argparse
import logging
import signal

from ..errors import ConfigError
from .config import OwnerConfig, read_token
from .permissions import check_private_paths
from .trainer import PrivateTrainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="lalora-private-trainer",
        description="The data owner's private trainer: reads the data and the secret, trains under DP, charges the "
        "ledger and answers a local relay (e.g. a Flower ClientApp) with noised updates only.",
    )
    parser.add_argument("--config", required=True, help="the owner's config: a .toml or .json file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = OwnerConfig.load(args.config)
        check_private_paths(config.node_config, config.allow_group_read)  # before anything is read or listened on
    except ConfigError as exc:
        parser.exit(2, f"lalora-private-trainer: {exc}\n")
    trainer = PrivateTrainer(
        config.load_task(),
        config.node_config,
        config.socket,
        read_token(config.token_file, create=True),
        max_payload_bytes=config.max_payload_bytes,
        max_models=config.max_models,
        request_timeout_s=config.request_timeout_s,
    )
    trainer.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: trainer.stop())
    trainer.serve_forever()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

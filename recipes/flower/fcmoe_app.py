"""Entry points of the hf_fcmoe Flower app; the code lives in `hf_fcmoe.federation.flower`."""

from pathlib import Path

from hf_fcmoe.federation.flower.client_app import app as clientapp
from hf_fcmoe.federation.flower.server_app import build_server_app

serverapp = build_server_app(app_dir=Path(__file__).resolve().parent)

__all__ = ["clientapp", "serverapp"]

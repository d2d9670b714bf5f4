"""Hugging Face Space entry point: `python app.py` serves on 127.0.0.1:7860.

Every option has an environment variable (read once, in phisum.config), so a Space can set
them as variables: --profile (PHISUM_PROFILE), --backend (PHISUM_BACKEND), --base-url
(PHISUM_BASE_URL), --dialogsum-dir (PHISUM_DIALOGSUM_DIR), adapters (PHISUM_ADAPTER_<NAME>),
host and port (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT).
"""

import argparse
import os

from phisum.config import add_backend_options, open_backend, settings_from_args
from phisum.startup import quiet_library_notices
from phisum.ui import build_demo, launch_options

quiet_library_notices()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--dialogsum-dir", default=None, help="local DialogSum folder for the live ROUGE tab")
    add_backend_options(parser)
    return parser.parse_args(argv)


# A Space imports this module and serves `demo`; `python app.py` also takes flags.
args = parse_args() if __name__ == "__main__" else parse_args([])
settings = settings_from_args(args)
backend = open_backend(args)
demo = build_demo(backend, args.dialogsum_dir or settings.dialogsum_dir, hub=not settings.hub_offline)

if __name__ == "__main__":
    demo.launch(server_name=args.host, server_port=args.port, **launch_options())

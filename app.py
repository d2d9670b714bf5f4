"""Hugging Face Space entry point: `python app.py` serves on 127.0.0.1:7860.

Host and port: --host/--port or GRADIO_SERVER_NAME/GRADIO_SERVER_PORT.
Profile: --profile or PHISUM_PROFILE (auto picks phi-2 on a GPU, else the embedded model).
"""

import argparse
import os

from phisum.ui import CSS, THEME, build_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--profile", default=None, help="auto, phi2, embedded or tiny")
    parser.add_argument("--dialogsum-dir", default=None, help="local DialogSum folder for the live ROUGE tab")
    args = parser.parse_args()
    if args.profile:
        os.environ["PHISUM_PROFILE"] = args.profile
    if args.dialogsum_dir:
        os.environ["PHISUM_DIALOGSUM_DIR"] = args.dialogsum_dir

demo = build_demo()

if __name__ == "__main__":
    demo.launch(server_name=args.host, server_port=args.port, theme=THEME, css=CSS)

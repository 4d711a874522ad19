"""`python -m tests.hub_server --port 8765 --root /tmp/hub --token hf_test`: serve until interrupted."""

from __future__ import annotations

import argparse

from tests.hub_server.server import HubServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, help="folder holding the repositories")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default="hf_test", help="the write token the server accepts")
    args = parser.parse_args()
    server = HubServer(args.root, token=args.token, port=args.port)
    print(f"loopback Hub at {server.url} (token {args.token}); Ctrl-C stops it", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()

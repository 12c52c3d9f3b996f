"""The control side of an RTP call (`/v1/rtp`) whose audio another program sends and receives (a gst-launch pipeline,
a media server): opens the call, says where to send the RTP, holds the control WebSocket, and hangs up.

Usage (README, "Non-browser peers (RTP)"):
    python -m client.rtp_control --url http://10.0.0.9:8000 --api-key KEY --voice VOICE_ID --reply-to 10.0.0.5:5004
prints `RTP: send to HOST PORT (payload type 96)`, then the events, until end of input on stdin (Ctrl+D); then
it sends `end`, waits for the rest of the converted voice and the end event, and exits.

As a library (inside a coroutine):
    async with rtp_call(url, token, voice_id, reply_to=("10.0.0.5", 5004)) as call:
        call.host, call.port          # where the peer sends its RTP
        ...                           # the peer sends and receives
        end = await call.hang_up()    # the end event (or the error event that ended the call)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets

from app.environment import CLIENT_API_KEY, client_api_key
from client.api import get_token

EVENT_TIMEOUT_S = 30.0
Event = dict[str, Any]


class CallRefused(RuntimeError):
    def __init__(self, event: Event) -> None:
        super().__init__(f"{event['code']}: {event['message']}")
        self.event = event


@dataclass
class RtpControl:
    socket: websockets.ClientConnection
    host: str
    port: int
    payload_type: int
    events: list[Event] = field(default_factory=list)

    async def hang_up(self) -> Event:
        """Sends `end`; returns the end event once the rest of the voice is out (or the error that ended the call)."""
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.socket.send(json.dumps({"type": "end"}))
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            async for text in self.socket:
                event = json.loads(text)
                self.events.append(event)
                if event["type"] in ("end", "error"):
                    return event
        raise ConnectionError("the control socket closed without an end event")


def ws_url(base_url: str) -> str:
    return base_url.replace("https://", "wss://").replace("http://", "ws://").rstrip("/") + "/v1/rtp"


@contextlib.asynccontextmanager
async def rtp_call(
    base_url: str,
    token: str,
    voice_id: str,
    *,
    reply_to: tuple[str, int] | None = None,
    payload_type: int = 96,
    ssrc: int | None = None,
    settings: dict[str, Any] | None = None,
) -> AsyncIterator[RtpControl]:
    """An open call; raises CallRefused when the server answers the start with an error."""
    rtp: dict[str, Any] = {"payload_type": payload_type, "ssrc": ssrc}
    if reply_to is not None:
        rtp["address"] = {"host": reply_to[0], "port": reply_to[1]}
    start = {"type": "start", "version": 1, "token": token, "voice_id": voice_id, "rtp": rtp}
    if settings:
        start["settings"] = settings
    async with websockets.connect(ws_url(base_url)) as socket:
        await socket.send(json.dumps(start))
        events = []
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while (event := json.loads(await socket.recv()))["type"] not in ("rtp", "error"):
                events.append(event)
        if event["type"] == "error":
            raise CallRefused(event)
        yield RtpControl(socket, event["host"], event["port"], event["payload_type"], [*events, event])


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    parser.add_argument("--api-key", default=client_api_key(), help=f"or {CLIENT_API_KEY}")
    parser.add_argument("--voice", required=True, help="the voice id")
    parser.add_argument("--reply-to", help="HOST:PORT for the converted voice (default: back to the RTP's source)")
    parser.add_argument("--payload-type", type=int, default=96)
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> int:
    reply_to = None
    if args.reply_to:
        host, _, port = args.reply_to.rpartition(":")
        reply_to = (host, int(port))
    token = get_token(args.url, args.api_key)
    try:
        async with rtp_call(args.url, token, args.voice, reply_to=reply_to, payload_type=args.payload_type) as call:
            print(f"RTP: send to {call.host} {call.port} (payload type {call.payload_type})", flush=True)
            printer = asyncio.create_task(_print_events(call))
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF (Ctrl+D) or Ctrl+C
            printer.cancel()
            print(json.dumps(await call.hang_up()))
    except CallRefused as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 1
    return 0


async def _print_events(call: RtpControl) -> None:
    async for text in call.socket:
        print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.api_key:
        print(f"an API key is needed: --api-key or {CLIENT_API_KEY}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_run(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())

"""Python client of the voice conversion service: HTTP helpers (`client.api`) and the streaming client and CLI
(`client.stream_client`, run as `python -m client.stream_client --help`)."""

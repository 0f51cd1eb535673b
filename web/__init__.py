"""The console for comms staff: server-rendered pages over the release
service. It holds the publisher's public key only, and imports ``release``,
``storage`` and ``config``, never ``jobs``."""

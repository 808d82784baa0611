"""The host side of gitops-airgap: the small trusted core that runs on offline hosts.

It owns the bundle format (reading, verifying, the manifest model) and applies a
verified bundle to a host as one transaction. It never imports ``bundler`` or Jinja2
and never opens a network socket.
"""

__version__ = "0.1.0"

"""The directory as a service: built from the config, reloaded on SIGHUP."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from appliance.config import Config
from appliance.directory.filedb import FileDirectory

log = Logger(namespace="appliance.directory")


class DirectoryService(Service):
    """Holds the user directory; a users file that fails to load on reload keeps the old data."""

    name = "directory"

    def __init__(self, config: Config, reactor: Any, threadpool: Any) -> None:
        self.directory = FileDirectory(str(config.directory.users), reactor, threadpool)

    def reconfigure(self, config: Config) -> None:
        if str(config.directory.users) != self.directory.path:
            log.warn("directory: a new users file path takes effect after a restart")
        self.directory.reload()

"""The outbox: uploads each agent run's files to the sandbox's artifact store as they change.

`target_for(identity.artifacts_uri)` picks the store; `Outbox(...).start()` watches the runs tree.
"""

from host_agent.outbox.outbox import Outbox
from host_agent.outbox.targets import ArtifactsUriError, DirectoryTarget, S3Target, UploadTarget, target_for

__all__ = ["ArtifactsUriError", "DirectoryTarget", "Outbox", "S3Target", "UploadTarget", "target_for"]

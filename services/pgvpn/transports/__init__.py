"""Transport profiles, by name: interchangeable strategies for carrying packets."""

from pgvpn.transports.base import Downlink, Profile, Session, Uplink
from pgvpn.transports.batched_profiles import BatchedJumboProfile, BatchedProfile
from pgvpn.transports.blog_v1 import BlogV1Profile
from pgvpn.transports.blog_v2 import BlogV2Profile
from pgvpn.transports.notify_only import NotifyOnlyProfile

# In the order reports show them: the blog's designs as published, then pgvpn's own.
PROFILES: dict[str, Profile] = {
    profile.name: profile for profile in (BlogV1Profile(), BlogV2Profile(), NotifyOnlyProfile(),
                                          BatchedProfile(), BatchedJumboProfile())
}

__all__ = ["PROFILES", "Downlink", "Profile", "Session", "Uplink"]

"""Transport profiles, by name: interchangeable strategies for carrying packets."""

from pgvpn.transports.base import Downlink, Profile, Session, Uplink
from pgvpn.transports.batched import BatchedJumboProfile, BatchedProfile

PROFILES: dict[str, Profile] = {
    profile.name: profile for profile in (BatchedProfile(), BatchedJumboProfile())
}

__all__ = ["PROFILES", "Downlink", "Profile", "Session", "Uplink"]

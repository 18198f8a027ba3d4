"""The lab's backends: each makes the same hosts from the same topology file, one as
Docker containers (docker.py), one as network namespaces (netns.py), behind the
interface in base.py. Only lab.controller.make_backend names them."""

"""`python -m serving`: start the service configured by environment variables (the Docker image's command)."""

import sys

from serving.server import main

sys.exit(main())

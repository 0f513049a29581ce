import sys

from rpo_app.cli import main

sys.exit(main())

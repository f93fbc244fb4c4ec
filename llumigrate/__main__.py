import sys

from llumigrate.cli.main import main

sys.exit(main())

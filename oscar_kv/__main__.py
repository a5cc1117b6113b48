"""`python -m oscar_kv ...`"""

import sys

from oscar_kv.cli import main

sys.exit(main())

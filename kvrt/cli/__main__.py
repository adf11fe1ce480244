"""`python -m kvrt.cli`, the same as the `kvrt` command."""

from kvrt.cli.commands import main

main()

from cliplab.cli import main

main()

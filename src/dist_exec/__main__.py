from dist_exec.cli import main

main()

from anycast_lb.cli import main

main()

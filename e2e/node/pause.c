/* The pod sandbox's init process: holds the pod's namespaces open until the runtime
 * stops it. Static, so its image needs no libraries. */
#include <signal.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

int main(void) {
  signal(SIGTERM, stop);
  signal(SIGINT, stop);
  for (;;) pause();
}

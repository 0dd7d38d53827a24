/*
 * statwalk: the floor under any no-change backup of a directory tree.
 *
 * Lists every directory below ROOT and lstat()s every entry, with THREADS threads taking
 * directories from one shared queue, and does nothing else: no repository, no key derivation,
 * no comparison. A backup that must notice any changed file has to do at least this, so with the
 * page cache dropped its wall time is a lower bound for phase (b) of bench/run.sh on the same
 * machine. run.sh builds it with `cc -O2 -pthread` into its work directory.
 *
 * usage: statwalk ROOT [THREADS]     prints "dirs=N entries=N errors=N" on stdout
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char **queue;
static size_t queue_len, queue_cap, busy;
static long dirs, entries, errors;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;

static void push(char *path) {
  pthread_mutex_lock(&lock);
  if (queue_len == queue_cap) {
    queue_cap = queue_cap ? queue_cap * 2 : 1024;
    queue = realloc(queue, queue_cap * sizeof *queue);
    if (!queue) { perror("realloc"); exit(2); }
  }
  queue[queue_len++] = path;
  pthread_cond_signal(&changed);
  pthread_mutex_unlock(&lock);
}

static void walk_one(char *path) {
  long n = 0, bad = 0;
  DIR *dir = opendir(path);
  if (!dir) {
    bad++;
  } else {
    struct dirent *e;
    while ((e = readdir(dir))) {
      if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
      struct stat st;
      if (fstatat(dirfd(dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) { bad++; continue; }
      n++;
      if (S_ISDIR(st.st_mode)) {
        char *child;
        if (asprintf(&child, "%s/%s", path, e->d_name) < 0) { perror("asprintf"); exit(2); }
        push(child);
      }
    }
    closedir(dir);
  }
  free(path);
  pthread_mutex_lock(&lock);
  dirs++;
  entries += n;
  errors += bad;
  busy--;
  pthread_cond_broadcast(&changed);
  pthread_mutex_unlock(&lock);
}

static void *worker(void *unused) {
  (void)unused;
  for (;;) {
    pthread_mutex_lock(&lock);
    while (queue_len == 0 && busy > 0) pthread_cond_wait(&changed, &lock);
    if (queue_len == 0) {  /* nothing queued and nobody walking: done */
      pthread_mutex_unlock(&lock);
      return NULL;
    }
    char *path = queue[--queue_len];
    busy++;
    pthread_mutex_unlock(&lock);
    walk_one(path);
  }
}

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: statwalk ROOT [THREADS]\n"); return 2; }
  int threads = argc > 2 ? atoi(argv[2]) : 16;
  if (threads < 1 || threads > 256) { fprintf(stderr, "THREADS must be 1-256\n"); return 2; }
  push(strdup(argv[1]));
  pthread_t tids[256];
  for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, worker, NULL);
  for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
  printf("dirs=%ld entries=%ld errors=%ld\n", dirs, entries, errors);
  return errors ? 1 : 0;
}
